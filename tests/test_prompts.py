"""Prompt pair and alignment: reference parity (official get_mapper / get_word_inds), the DESIGN.md §2 rule, subject
positions, bad inputs, and the PhotoswapPromptPair node on tiny SD1.5 / SD2-v / SDXL models."""
from __future__ import annotations

import ast
import copy
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch

from devtools.comfy_env import bootstrap

# The repo root is a package (the pack's __init__.py imports comfy_api); pytest imports it while setting up this
# module's items, so ComfyUI must be importable before that: bootstrap at collection (idempotent, as the fixture).
bootstrap()

REFERENCE_REPO = Path(os.environ.get("PHOTOSWAP_REFERENCE_REPO", "/work/.mirror/eric-ai-lab+photoswap/repo"))


# ---------------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def A(comfy, pack):
    """The prompt bookkeeping: alignment.py's token rules and prompts.py's pair, as one namespace."""
    import types

    from comfyui_photoswap.photoswap_core import alignment, prompts

    return types.SimpleNamespace(**{**vars(alignment), **vars(prompts)})


@pytest.fixture(scope="module")
def tok(comfy):
    """The real SD1 CLIP tokenizer (HF CLIPTokenizer, the files ComfyUI ships)."""
    import comfy.sd1_clip

    return comfy.sd1_clip.SDTokenizer().tokenizer


@pytest.fixture(scope="module")
def err_type(pack):
    from comfyui_photoswap.photoswap_core.errors import PhotoswapInputError

    return PhotoswapInputError


def lcs_length(x, y):
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def check_rule(pair_or_ids, mapper, alphas, source_ids, target_ids, max_len=77):
    """DESIGN.md §2: global alignment (match +1, mismatch -1, gap 0) ⇒ aligned pairs are identical tokens, in order,
    as many as the longest common subsequence; unaligned target tokens get -1/alpha 0; the tail maps j -> j."""
    n = len(target_ids)
    assert len(mapper) == len(alphas) == max_len
    aligned = [(j, mapper[j]) for j in range(n) if mapper[j] != -1]
    for j in range(n):
        assert alphas[j] == (0.0 if mapper[j] == -1 else 1.0)
    for j, i in aligned:
        assert source_ids[i] == target_ids[j]
    src_order = [i for _, i in aligned]
    assert src_order == sorted(src_order) and len(set(src_order)) == len(src_order)
    assert len(aligned) == lcs_length(list(source_ids), list(target_ids))
    assert list(mapper[n:]) == list(range(n, max_len))
    assert all(a == 1.0 for a in alphas[n:])


# ---------------------------------------------------------------------------------------------------------------------
# parity with the official implementation
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_parity_with_official_mapper_alphas_ids(A, tok, parity_dir):
    from safetensors.torch import load_file

    manifest = json.loads((parity_dir / "manifest.json").read_text())
    text = load_file(str(parity_dir / "text.safetensors"))
    source, target = manifest["prompts"]
    pair = A.build_prompt_pair(tok, source, manifest["source_subject_word"], "sks man")
    assert pair.target_prompt == target
    assert torch.equal(pair.mapper_tensor(), text["mapper"][0])
    assert torch.equal(pair.alphas_tensor(), text["alphas"][0])
    assert pair.mapper_tensor().dtype == text["mapper"].dtype
    assert list(pair.mapper[:10]) == [0, 1, 2, 3, 4, -1, 5, 6, 8, 9]
    assert [j for j, a in enumerate(pair.alphas) if a != 1.0] == [5]
    eos = tok.eos_token_id
    for row, ids in enumerate((pair.source_ids, pair.target_ids)):
        padded = list(ids) + [eos] * (77 - len(ids))
        assert padded == text["input_ids"][row].tolist()
        assert list(ids) == manifest["tokens"]["encode"][row]
    # LocalBlend words: source "man", target "sks" (the concept identifier)
    assert list(pair.source_subject_positions) == manifest["localblend_word_inds"]["source"]
    assert list(pair.target_subject_positions) == manifest["localblend_word_inds"]["target"]
    assert pair.identifier_words == manifest["target_subject_word"] == "sks"
    # the low-level API gives the same
    mapper, alphas = A.align_prompts(tok, tok.encode(source), tok.encode(target))
    assert (mapper, alphas) == (pair.mapper, pair.alphas)


# (source, target, mapper[:len(target)+1], indices with alpha 0): produced by the official get_mapper (commit 570ca0de)
REFERENCE_TABLE = [
    ("a cat", "a sks dog", [0, 1, -1, -1, 3, 5], [2, 3]),
    ("a cat", "a dog", [0, 1, -1, 3, 4], [2]),
    ("a man and a man", "a man and a sks man", [0, 1, 2, 3, 4, -1, 5, 6, 8], [5]),
    ("a red cat on a red mat", "a cat on a mat", [0, 1, 3, 4, 5, 7, 8, 7], []),
    ("photo of a big dog", "a big photo of a dog", [0, -1, -1, 1, 2, 3, 5, 6, 8], [1, 2]),
    ("a a a", "a a", [0, 1, 2, 4, 4], []),
    ("the hippopotamus in the sun", "the sks dog in the sun", [0, 1, -1, -1, 5, 6, 7, 8, 8], [2, 3]),
    ("", "a sks dog", [0, -1, -1, -1, 1, 5], [1, 2, 3]),
    ("a photo of a cat", "", [0, 6, 2], []),
]


@pytest.mark.unit
@pytest.mark.parametrize("source,target,head,zeros", REFERENCE_TABLE)
def test_reference_table(A, tok, source, target, head, zeros):
    src, tgt = tok.encode(source), tok.encode(target)
    mapper, alphas = A.align_prompts(tok, src, tgt)
    assert list(mapper[:len(head)]) == head
    assert [j for j, a in enumerate(alphas) if a == 0.0] == zeros
    check_rule(None, mapper, alphas, src, tgt)


def _load_reference_functions():
    """The official utils.py alignment functions, extracted from the read-only mirror (skips when absent)."""
    if not (REFERENCE_REPO / "HEAD").exists() and not (REFERENCE_REPO / ".git").exists():
        pytest.skip(f"official photoswap repo not mirrored at {REFERENCE_REPO} (set PHOTOSWAP_REFERENCE_REPO)")
    result = subprocess.run(["git", "-C", str(REFERENCE_REPO), "show", "HEAD:utils.py"], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot read utils.py from {REFERENCE_REPO}: {result.stderr.strip()}")
    import numpy as np

    wanted = {"ScoreParams", "get_matrix", "get_traceback_matrix", "global_align", "get_aligned_sequences",
              "get_mapper", "get_word_inds"}
    tree = ast.parse(result.stdout)
    body = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in wanted]
    namespace = {"np": np, "torch": torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), "photoswap_reference_utils", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.unit
def test_random_pairs_match_official_code(A, tok):
    """800 random prompt pairs (repeated words, deletions, insertions, punctuation, multi-token words) against the
    official get_mapper and get_word_inds run live; skipped where the official repo is not mirrored."""
    ref = _load_reference_functions()
    words = "a the cat dog man sks photo of on in red big small a a the hippopotamus , . sitting next to".split()
    rng = random.Random(1234)
    for _ in range(800):
        x = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        y = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        ref_mapper, ref_alphas = ref["get_mapper"](x, y, tok)
        mapper, alphas = A.align_prompts(tok, tok.encode(x), tok.encode(y))
        assert list(mapper) == ref_mapper.tolist(), (x, y)
        assert list(alphas) == ref_alphas.tolist(), (x, y)
        check_rule(None, mapper, alphas, tok.encode(x), tok.encode(y))
    plain = [w for w in words if w.isalpha()]
    for _ in range(300):
        x = " ".join(rng.choice(plain) for _ in range(rng.randint(1, 14)))
        word = rng.choice(x.split())
        assert list(A.word_token_positions(tok, x, word)) == ref["get_word_inds"](x, word, tok).tolist(), (x, word)


# ---------------------------------------------------------------------------------------------------------------------
# alignment cases with the real SD1 tokenizer
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_equal_length_replacement(A, tok):
    pair = A.build_prompt_pair(tok, "a photo of a cat on the grass", "cat", "dog")
    assert len(pair.source_ids) == len(pair.target_ids)
    assert pair.target_prompt == "a photo of a dog on the grass"
    # mismatch (-1) loses to two gaps (0): the new word is unaligned and keeps its own column
    assert [j for j, a in enumerate(pair.alphas) if a == 0.0] == [5]
    assert list(pair.mapper[:10]) == [0, 1, 2, 3, 4, -1, 6, 7, 8, 9]
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)


@pytest.mark.unit
def test_inserted_words(A, tok):
    pair = A.build_prompt_pair(tok, "a cat", "cat", "sks dog")
    assert pair.target_prompt == "a sks dog"
    assert len(pair.target_ids) == len(pair.source_ids) + 1
    assert list(pair.mapper[:6]) == [0, 1, -1, -1, 3, 5]
    assert [j for j, a in enumerate(pair.alphas) if a == 0.0] == [2, 3]
    assert pair.source_subject_positions == (2,)
    assert pair.target_subject_positions == (2,)  # "sks"
    assert pair.class_word == "dog" and pair.identifier_words == "sks"
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)


@pytest.mark.unit
def test_multi_token_words(A, tok):
    assert len(tok.encode("hippopotamus")) - 2 == 3  # hippo / potam / us
    pair = A.build_prompt_pair(tok, "a photo of a hippopotamus, in the sun", "hippopotamus", "sks dog")
    assert pair.source_subject_positions == (5, 6, 7)
    assert pair.target_prompt == "a photo of a sks dog, in the sun"
    assert pair.target_subject_positions == (5,)
    assert len(pair.source_ids) == len(pair.target_ids) + 1
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)
    # a multi-token concept identifier: all its tokens are the target positions
    ident = "zxqwv"
    n_ident = len(tok.encode(ident)) - 2
    assert n_ident > 1
    pair = A.build_prompt_pair(tok, "a hippopotamus", "hippopotamus", f"{ident} dog")
    assert pair.target_subject_positions == tuple(range(2, 2 + n_ident))
    assert pair.source_subject_positions == (2, 3, 4)
    assert [j for j, a in enumerate(pair.alphas) if a == 0.0] == list(range(2, 3 + n_ident))
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)


def _prompt_with_tokens(tok, n_text_tokens, tail="cat"):
    prompt = " ".join(["a"] * (n_text_tokens - 1) + [tail])
    assert len(tok.encode(prompt)) == n_text_tokens + 2
    return prompt


@pytest.mark.unit
def test_prompts_near_77_tokens(A, tok, err_type):
    ok = _prompt_with_tokens(tok, 75)  # 77 with BOS/EOS: the limit
    pair = A.build_prompt_pair(tok, ok, "cat", "dog")
    assert len(pair.source_ids) == len(pair.target_ids) == 77
    assert len(pair.mapper) == 77 and pair.mapper[76] == 76 and pair.alphas[75] == 0.0
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)

    too_long = _prompt_with_tokens(tok, 76)
    with pytest.raises(err_type) as info:
        A.build_prompt_pair(tok, too_long, "cat", "dog")
    assert info.value.input_name == "source_prompt"
    assert "78" in str(info.value) and "77" in str(info.value) and "shorten" in info.value.fix

    # the source fits, but replacing the subject by two words pushes the target over the limit
    with pytest.raises(err_type) as info:
        A.build_prompt_pair(tok, ok, "cat", "sks dog")
    assert info.value.input_name == "concept_words"
    assert "78" in str(info.value)
    # an explicit target that is too long names the target prompt
    with pytest.raises(err_type) as info:
        A.build_prompt_pair(tok, _prompt_with_tokens(tok, 10), "cat", "dog", target_prompt=too_long + " dog")
    assert info.value.input_name == "target_prompt"
    with pytest.raises(err_type):
        A.align_prompts(tok, tok.encode(too_long), tok.encode("a dog"))


@pytest.mark.unit
def test_different_token_lengths(A, tok):
    # target shorter than source: the tail maps j -> j (reference), even onto source text tokens
    pair = A.build_prompt_pair(tok, "a photo of a big fluffy white cat", "cat", "dog",
                               target_prompt="a photo of a dog")
    assert len(pair.target_ids) < len(pair.source_ids)
    n = len(pair.target_ids)
    assert list(pair.mapper[n:n + 3]) == [n, n + 1, n + 2]
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)
    # target much longer than source
    pair = A.build_prompt_pair(tok, "a cat", "cat", "sks dog",
                               target_prompt="a sks dog sitting on a wooden bench in a sunny park, 4k photo")
    assert len(pair.target_ids) > len(pair.source_ids) + 5
    assert pair.mapper[0] == 0 and pair.mapper[len(pair.target_ids) - 1] == len(pair.source_ids) - 1  # EOS ↔ EOS
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)


@pytest.mark.unit
def test_rule_on_random_pairs(A, tok):
    """The DESIGN.md §2 rule (independent of the reference code) on random prompts of different lengths."""
    words = "a the cat dog sks photo of on red big hippopotamus , . sitting".split()
    rng = random.Random(7)
    for _ in range(300):
        x = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(0, 20))))
        y = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(0, 20))))
        mapper, alphas = A.align_prompts(None, x, y)
        check_rule(None, mapper, alphas, x, y)


@pytest.mark.unit
def test_tensors(A, tok):
    pair = A.build_prompt_pair(tok, "A photo of a man", "man", "sks man")
    m, a = pair.mapper_tensor(), pair.alphas_tensor()
    assert m.shape == a.shape == (77,) and m.dtype == torch.int64 and a.dtype == torch.float32
    assert pair.alphas_tensor(dtype=torch.float16).dtype == torch.float16
    with pytest.raises(Exception):
        pair.mapper = ()  # frozen


# ---------------------------------------------------------------------------------------------------------------------
# words, positions, target prompt
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("prompt,word,expected", [
    ("A photo of a man", "man", (5,)),
    ("a man, walking.", "man", (2,)),  # punctuation (the reference's space split would miss "man,")
    ("a Man's hat", "man", (2,)),  # case and possessive
    ("superman and a woman", "man", ()),  # not inside other words
    ("a man and a man", "man", (2, 5)),  # every occurrence
    ("a  photo of   a cat", "cat", (5,)),  # extra spaces
    ("a teddy bear on a bed", "teddy bear", (2, 3)),  # several words
    ("a hippopotamus", "hippopotamus", (2, 3, 4)),
])
def test_word_token_positions(A, tok, prompt, word, expected):
    assert A.word_token_positions(tok, prompt, word) == expected


@pytest.mark.unit
@pytest.mark.parametrize("source,subject,concept,expected", [
    ("A photo of a man", "man", "sks man", "A photo of a sks man"),
    ("a cat.", "cat", "sks dog", "a sks dog."),
    ("a Cat on a concatenated mat", "cat", "sks  dog", "a sks dog on a concatenated mat"),
    ("a (man:1.2) walking", "man", "sks man", "a (sks man:1.2) walking"),
    ("a cat's toy", "cat", "sks dog", "a sks dog's toy"),
])
def test_make_target_prompt(A, source, subject, concept, expected):
    assert A.make_target_prompt(source, subject, concept) == expected


@pytest.mark.unit
@pytest.mark.parametrize("concept,subject,class_word,identifier,cls", [
    ("sks dog", "cat", None, "sks", "dog"),  # DreamBooth convention: last word is the class
    ("sks man", "man", None, "sks", "man"),  # the subject word is the class
    ("dog sks", "dog", None, "sks", "dog"),
    ("sks", "cat", None, "sks", ""),  # one word: it is the identifier
    ("sks dog", "cat", "", "sks dog", ""),  # explicitly no class word
    ("sks teddy bear", "cat", "teddy bear", "sks", "teddy bear"),
    ("dog", "dog", "dog", "dog", "dog"),  # nothing left: the identifier is the whole concept
])
def test_identifier_rule(A, tok, concept, subject, class_word, identifier, cls):
    pair = A.build_prompt_pair(tok, f"a photo of a {subject}", subject, concept, class_word=class_word)
    assert (pair.identifier_words, pair.class_word) == (identifier, cls)
    n_ident = len(tok.encode(identifier)) - 2
    start = pair.target_ids.index(tok.encode(concept)[1])
    offset = concept.split().index(identifier.split()[0])
    assert pair.target_subject_positions == tuple(range(start + offset, start + offset + n_ident))


@pytest.mark.unit
def test_concept_maps_subject_ties_the_concept_to_the_subject(A, tok):
    """concept_maps='subject': the concept's tokens take the subject's columns (alpha 1), spread in order when the
    counts differ; every other column keeps the reference alignment; 'own' is the reference."""
    own = A.build_prompt_pair(tok, "a photo of a cat on the grass", "cat", "sks dog")
    assert own.concept_maps == "own" and A.CONCEPT_MAPS[0] == "own"
    tied = A.build_prompt_pair(tok, "a photo of a cat on the grass", "cat", "sks dog", concept_maps="subject")
    (pair,) = tied.subjects
    assert pair.concept_positions == (5, 6) and pair.source_positions == (5,)
    assert [tied.mapper[j] for j in (5, 6)] == [5, 5] and [tied.alphas[j] for j in (5, 6)] == [1.0, 1.0]
    assert [own.alphas[j] for j in (5, 6)] == [0.0, 0.0]
    others = [j for j in range(len(own.mapper)) if j not in (5, 6)]
    assert [tied.mapper[j] for j in others] == [own.mapper[j] for j in others]
    assert [tied.alphas[j] for j in others] == [own.alphas[j] for j in others]
    assert tied.target_subject_positions == own.target_subject_positions  # LocalBlend words unchanged
    assert "subject's cross-attention maps" in tied.describe()
    # two source tokens onto one target token and the reverse, in order; two pairs, each onto its own subject
    many = A.build_prompt_pair(tok, "a blue tit on a branch", "blue tit", "sks", concept_maps="subject")
    (pair,) = many.subjects
    assert many.mapper[pair.concept_positions[0]] == pair.source_positions[0]
    both = A.build_prompt_pair(tok, "a cat and a mug", "cat; mug", "sks dog; zwx", concept_maps="subject")
    for pair in both.subjects:
        src = pair.source_positions
        assert [both.mapper[j] for j in pair.concept_positions] == [
            src[k * len(src) // len(pair.concept_positions)] for k in range(len(pair.concept_positions))]
        assert all(both.alphas[j] == 1.0 for j in pair.concept_positions)
    # identical prompts: no pair changes, nothing to tie: the alignment is the identity either way
    same = A.build_prompt_pair(tok, "a cat", "cat", "cat", concept_maps="subject")
    assert same.mapper == A.build_prompt_pair(tok, "a cat", "cat", "cat").mapper and all(a == 1.0 for a in same.alphas)


@pytest.mark.unit
def test_explicit_target_and_repeated_subject(A, tok):
    pair = A.build_prompt_pair(tok, "A cat sitting next to a cat.", "cat", "sks dog",
                               target_prompt="A sks dog sitting next to a cat.")
    assert pair.source_subject_positions == (2, 7)
    assert pair.target_subject_positions == (2,)
    check_rule(pair, pair.mapper, pair.alphas, pair.source_ids, pair.target_ids)
    # the identifier is taken inside the concept occurrence, even when it also appears elsewhere
    pair = A.build_prompt_pair(tok, "a sks toy and a dog", "dog", "sks dog")
    assert pair.target_prompt == "a sks toy and a sks dog"
    assert pair.target_subject_positions == (6,)


# ---------------------------------------------------------------------------------------------------------------------
# bad input (issue 8): each names the input and says how to fix it
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("kwargs,input_name,in_message", [
    (dict(source_prompt="", subject_word="cat", concept_words="sks dog"), "source_prompt", ["type the source prompt"]),
    (dict(source_prompt="   \n", subject_word="cat", concept_words="sks dog"), "source_prompt", ["subject word"]),
    (dict(source_prompt="a cat", subject_word=" ", concept_words="sks dog"), "subject_word", ["'a', 'cat'"]),
    (dict(source_prompt="A photo of a man, smiling", subject_word="cat", concept_words="sks dog"), "subject_word",
     ["'cat' does not occur", "'photo'", "'man'", "'smiling'"]),
    (dict(source_prompt="a superman", subject_word="man", concept_words="sks dog"), "subject_word",
     ["whole word", "'superman'"]),
    (dict(source_prompt="a man and a man", subject_word="man", concept_words="sks man"), "target_prompt",
     ["occurs 2 times", "write the target prompt yourself", "'sks man'"]),
    (dict(source_prompt="a cat", subject_word="cat", concept_words="  "), "concept_words",
     ["connect a PHOTOSWAP_CONCEPT"]),
    (dict(source_prompt="a cat", subject_word="cat", concept_words="sks dog", target_prompt="a photo of a dog"),
     "target_prompt", ["contains the concept words 'sks dog'", "add 'sks dog' to the target prompt"]),
    (dict(source_prompt="a cat", subject_word="cat", concept_words="sks dog", target_prompt="a sksdog"),
     "target_prompt", ["'sks dog'"]),
    (dict(source_prompt="a cat", subject_word="cat", concept_words="sks dog", concept_maps="subjects"),
     "concept_maps", ["own, subject", "'subjects'"]),
])
def test_bad_inputs(A, tok, err_type, kwargs, input_name, in_message):
    with pytest.raises(err_type) as info:
        A.build_prompt_pair(tok, **kwargs)
    err = info.value
    assert err.input_name == input_name
    assert isinstance(err, ValueError) and err.fix and err.expected
    message = str(err)
    assert f"input '{input_name}'" in message and "Fix:" in message
    for fragment in in_message:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------------------------------
# tokenizers inside ComfyUI CLIP objects
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_tokenizer_of_each_family(A, tiny_sd15, tiny_sd2v, tiny_sdxl):
    assert A.tokenizer_of(tiny_sd15.clip) is tiny_sd15.clip.tokenizer.clip_l.tokenizer
    assert A.tokenizer_of(tiny_sd2v.clip) is tiny_sd2v.clip.tokenizer.clip_h.tokenizer
    assert A.tokenizer_of(tiny_sdxl.clip) is tiny_sdxl.clip.tokenizer.clip_l.tokenizer
    for clip in (tiny_sd15.clip, tiny_sd2v.clip, tiny_sdxl.clip):
        assert A.tokenizer_of(clip).encode("A photo of a man") == [49406, 320, 1125, 539, 320, 786, 49407]


@pytest.mark.unit
def test_comfy_tokenization_equals_hf_for_plain_prompts(A, tok, tiny_sd15, tiny_sd2v, tiny_sdxl):
    prompts = ["A photo of a man", "a hippopotamus, in the sun.", "", "a cat's toy, dog-like; 4k!"]
    for clip in (tiny_sd15.clip, tiny_sd2v.clip, tiny_sdxl.clip):
        view = A.PromptTokenizer.from_clip(clip)
        for prompt in prompts:
            assert view.encode(prompt) == tok.encode(prompt)
        # weight syntax is what ComfyUI strips: positions follow the tokens the model sees
        pair = A.build_prompt_pair(clip, "a (man:1.2) walking", "man", "sks man")
        assert pair.target_prompt == "a (sks man:1.2) walking"
        assert pair.source_ids == tuple(tok.encode("a man walking"))
        assert pair.target_ids == tuple(tok.encode("a sks man walking"))
        assert pair.source_subject_positions == (2,) and pair.target_subject_positions == (2,)


def _clip_with_embedding(clip, tmp_path, name="myconcept", n_vectors=2, width=32):
    from safetensors.torch import save_file

    vectors = torch.randn(n_vectors, width, generator=torch.Generator().manual_seed(3))
    save_file({"clip_l": vectors}, str(tmp_path / f"{name}.safetensors"))
    out = clip.clone()
    out.tokenizer = copy.deepcopy(clip.tokenizer)
    out.tokenizer.clip_l.embedding_directory = str(tmp_path)
    return out, vectors


@pytest.mark.unit
def test_textual_inversion_embedding_positions(A, tiny_sd15, tmp_path, err_type):
    clip, _ = _clip_with_embedding(tiny_sd15.clip, tmp_path)
    pair = A.build_prompt_pair(clip, "A photo of a cat", "cat", "embedding:myconcept")
    assert pair.target_prompt == "A photo of a embedding:myconcept"
    # two embedding vectors at positions 5, 6, each an opaque (negative sentinel) token, both new (alpha 0)
    assert pair.target_subject_positions == (5, 6)
    assert all(t < 0 for t in pair.target_ids[5:7]) and len(pair.target_ids) == 8
    assert [j for j, a in enumerate(pair.alphas) if a == 0.0] == [5, 6]
    # an embedding in both prompts aligns with itself
    pair = A.build_prompt_pair(clip, "embedding:myconcept next to a cat", "cat", "dog")
    assert pair.source_ids[1:3] == pair.target_ids[1:3] and pair.mapper[1:3] == (1, 2)
    assert pair.source_subject_positions == (6,)
    # an embedding with a class word
    pair = A.build_prompt_pair(clip, "A photo of a cat", "cat", "embedding:myconcept dog")
    assert pair.identifier_words == "embedding:myconcept" and pair.target_subject_positions == (5, 6)
    # a missing embedding vanishes in ComfyUI: refused with a clear message
    with pytest.raises(err_type) as info:
        A.build_prompt_pair(clip, "A photo of a cat", "cat", "embedding:nothere dog")
    assert info.value.input_name == "concept_words" and "embeddings folder" in info.value.fix


# ---------------------------------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def node(pack):
    from comfyui_photoswap.nodes.prompt_nodes import PhotoswapPromptPair

    return PhotoswapPromptPair


def _run(node, clip, **kwargs):
    args = dict(source_prompt="A photo of a cat", subject_word="cat", concept_words="sks dog")
    args.update(kwargs)
    return node.execute(clip=clip, **args).result


@pytest.mark.integration
def test_node_registered_and_schema(pack, node):
    from comfyui_photoswap.nodes import NODE_CLASSES

    assert node in NODE_CLASSES
    schema = node.define_schema()
    assert schema.display_name == "Photoswap Prompt Pair"
    assert schema.category == "photoswap/prompts" and schema.description
    assert all(i.tooltip for i in schema.inputs)
    assert [o.display_name for o in schema.outputs] == ["source_positive", "target_positive", "negative", "prompts"]


@pytest.mark.integration
@pytest.mark.parametrize("family,width", [("sd15", 32), ("sd2v", 32), ("sdxl", 64)])
def test_node_outputs(node, request, family, width, tok):
    import nodes as comfy_nodes

    tiny = request.getfixturevalue(f"tiny_{family}")
    source, target, negative, prompts = _run(node, tiny.clip, negative_prompt="blurry")
    for cond in (source, target, negative):
        assert len(cond) == 1
        assert tuple(cond[0][0].shape) == (1, 77, width)
        if family == "sdxl":
            assert cond[0][1].get("pooled_output") is not None
            assert tuple(cond[0][1]["pooled_output"].shape) == (1, 32)
    assert not torch.equal(source[0][0], target[0][0])
    assert prompts.target_prompt == "A photo of a sks dog"
    concept_tokens = tok.encode("sks dog")[1:-1]
    start = prompts.target_subject_positions[0]
    assert list(prompts.target_ids[start:start + 2]) == concept_tokens
    assert prompts.source_subject_positions == (5,) and prompts.target_subject_positions == (5,)
    # encoded exactly like core CLIPTextEncode
    (core_source,) = comfy_nodes.CLIPTextEncode().encode(tiny.clip, "A photo of a cat")
    assert torch.equal(core_source[0][0], source[0][0])
    (core_target,) = comfy_nodes.CLIPTextEncode().encode(tiny.clip, "A photo of a sks dog")
    assert torch.equal(core_target[0][0], target[0][0])


@pytest.mark.integration
def test_node_concept_overrides_typed_words(node, pack, tiny_sd15, tok):
    from comfyui_photoswap.photoswap_core.concept import Concept

    concept = Concept(words="zwx cat", class_word="cat", kind="words", token_ids=tuple(tok.encode("zwx cat")[1:-1]))
    _, target, _, prompts = _run(node, tiny_sd15.clip, source_prompt="A photo of a man", subject_word="man",
                                 concept_words="sks dog", concept=concept)
    assert prompts.concept_words == "zwx cat" and prompts.target_prompt == "A photo of a zwx cat"
    assert "sks" not in prompts.target_prompt
    n_ident = len(tok.encode("zwx")) - 2
    assert prompts.identifier_words == "zwx"
    assert prompts.target_subject_positions == tuple(range(5, 5 + n_ident))
    # a concept with an unknown class word: inferred (the last word)
    concept = Concept(words="zwx dog", class_word="", kind="lora", token_ids=())
    prompts = _run(node, tiny_sd15.clip, concept=concept)[3]
    assert prompts.identifier_words == "zwx" and prompts.class_word == "dog"


@pytest.mark.integration
def test_node_explicit_target_and_errors(node, tiny_sd15, err_type):
    _, target, _, prompts = _run(node, tiny_sd15.clip, target_prompt="A sks dog on the grass")
    assert prompts.target_prompt == "A sks dog on the grass" and prompts.target_subject_positions == (2,)
    with pytest.raises(err_type) as info:
        _run(node, tiny_sd15.clip, subject_word="dog")
    assert info.value.input_name == "subject_word"
    with pytest.raises(err_type) as info:
        _run(node, tiny_sd15.clip, target_prompt="A dog on the grass")
    assert info.value.input_name == "target_prompt"
    with pytest.raises(err_type) as info:
        _run(node, None)
    assert info.value.input_name == "clip"
    from comfyui_photoswap.photoswap_core.concept import Concept

    with pytest.raises(err_type) as info:
        _run(node, tiny_sd15.clip, concept=Concept(words=" ", class_word="", kind="words", token_ids=()))
    assert info.value.input_name == "concept"
    with pytest.raises(err_type) as info:
        _run(node, tiny_sd15.clip, concept="sks dog")
    assert info.value.input_name == "concept"


@pytest.mark.integration
def test_node_with_embedding(node, tiny_sd15, tmp_path):
    clip, _ = _clip_with_embedding(tiny_sd15.clip, tmp_path)
    source, target, _, prompts = _run(node, clip, concept_words="embedding:myconcept")
    assert prompts.target_subject_positions == (5, 6)
    assert tuple(target[0][0].shape) == (1, 77, 32)
    assert not torch.equal(source[0][0], target[0][0])


@pytest.mark.integration
def test_node_does_not_mutate_clip(node, tiny_sd15):
    before = tiny_sd15.clip.encode_from_tokens(tiny_sd15.clip.tokenize("a photo"))
    _run(node, tiny_sd15.clip)
    after = tiny_sd15.clip.encode_from_tokens(tiny_sd15.clip.tokenize("a photo"))
    assert torch.equal(before, after)
