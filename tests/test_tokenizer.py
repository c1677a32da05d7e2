"""Tokenizers: the released one rebuilt from vocab+merges must give the ids transformers' Qwen2 tokenizer gives
for the same files (and the ids of docs/reference.md 8.1); the tiny one must carry the same special strings and fit
the tiny preset; save() output must be readable by transformers and by us."""

import json
import shutil

import pytest

from conftest import RELEASED_FIXTURES
from vlmcook.config import MiniCPMVConfig
from vlmcook.data.tokenizer import REQUIRED, Tokenizer, TokenizerError

TEXTS = [
    "Hello!",
    "<image_id>12</image_id>",
    "The quick brown fox jumps over the lazy dog. It's 12:45, we'll see; I'M READY!!",
    "用户问了一个问题，助手给出了回答。视频里有一只猫。",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\r\n",
    "<|im_start|>user\n(<image>./</image>)\nWhat is this?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "<image><unk><unk></image><slice><unk></slice>\n<ref>cat</ref><box>12 34 56 78</box><quad></quad><point></point>",
    "  leading  spaces\t\ttabs   trailing   \n\n\n  ",
    "emoji 🤖👍🏽 café naïve e\u0301 ﬁ Ångström",
    "<|endoftext|><|im_end|><tool_call>{\"a\": 1}</tool_call><think>hmm</think>",
    "mixed 中文 and English 123456 with code `x = y[0]` and math $\\frac{a}{b}$",
]


@pytest.fixture(scope="module")
def released(reference_dir):
    return Tokenizer.from_dir(reference_dir)


@pytest.fixture(scope="module")
def hf_released(reference_dir, tmp_path_factory):
    """transformers' Qwen2 tokenizer over the released files (the release's own class needs remote code)."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_tok")
    for f in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        shutil.copy(reference_dir / f, d / f)
    cfg = json.loads((reference_dir / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg.pop("auto_map", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return transformers.AutoTokenizer.from_pretrained(str(d))


def test_released_ids_match_transformers(released, hf_released):
    assert released.vocab_size == len(hf_released) == 151748
    for text in TEXTS:
        ids = released.encode(text)
        assert ids == hf_released.encode(text, add_special_tokens=False), text
        assert released.decode(ids) == hf_released.decode(ids)
        assert released.decode(ids, skip_special_tokens=True) == hf_released.decode(ids, skip_special_tokens=True)


def test_released_ids_from_the_reference(released):
    # docs/reference.md 8.1 table and 11.15
    assert released.encode("Hello!") == [9707, 0]
    assert released.encode("<image_id>12</image_id>") == [151681, 16, 17, 151682]
    assert released.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n") == \
        [151644, 77091, 198, 151667, 271, 151668, 271]
    assert released.encode("\n") == [198] and released.encode("\n\n") == [271]
    named = dict(unk_id=128244, endoftext_id=151643, pad_id=151643, im_start_id=151644, im_end_id=151645,
                 think_id=151667, think_end_id=151668, image_start_id=151669, image_end_id=151670,
                 slice_start_id=151679, slice_end_id=151680, image_id_start_id=151681, image_id_end_id=151682)
    assert {k: getattr(released, k) for k in named} == named
    assert released.stop_ids == (151645, 151643)
    assert released.token_to_id("<|reserved_62|>") == 151747 and released.token_to_id("<unit>") == 151683
    assert released.id_to_token(0) == "!"


def test_fixture_subset_splits_every_recorded_word_as_the_full_files(released):
    # encodings.json: each word the tests encode -> its ids under the full released vocab.json + merges.txt
    # (tests/fixtures/make_tokenizer_subset.py); a merge missing from the subset would split a word differently.
    words = json.loads((RELEASED_FIXTURES / "encodings.json").read_text(encoding="utf-8"))
    assert len(words) > 100
    for word, ids in words.items():
        assert [t.id for t in released.tok.model.tokenize(word)] == ids, word


def test_released_think_tags_survive_skip_special(released):
    ids = released.encode("<|im_start|><think>a</think>b<|im_end|>")
    assert released.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


def test_tiny_fits_tiny_preset():
    tok = Tokenizer.tiny()
    cfg = MiniCPMVConfig.from_name("tiny")
    assert tok.vocab_size == 512 <= cfg.llm.vocab_size
    assert tok.endoftext_id == cfg.llm.bos_token_id and tok.im_end_id == cfg.llm.eos_token_id
    for t in REQUIRED + ("<unit>", "</unit>", "<tool_call>", "</tool_call>"):
        assert tok.encode(t) == [tok.token_to_id(t)], t


def test_tiny_roundtrips_any_text_and_recognises_specials():
    tok = Tokenizer.tiny()
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text.replace("e\u0301", "\u00e9")  # NFC, as the released normaliser
    ids = tok.encode("<|im_start|>user\n<image><unk></image><|im_end|>")
    assert ids[0] == tok.im_start_id and ids[-1] == tok.im_end_id and tok.unk_id in ids
    assert tok.decode(tok.encode("<|im_start|><think>a</think>b<|im_end|>"), skip_special_tokens=True) == \
        "<think>a</think>b"  # <think> is added but not special, as released
    assert len(tok.encode("<think>\n\n</think>\n\n")) == 4  # the empty think block, 4 tokens as in the release


def test_tiny_chars_is_one_token_per_character_with_the_same_ids(tmp_path):
    bpe, chars = Tokenizer.tiny(), Tokenizer.tiny(chars=True)
    text = "neighbourhood marked trails, 42 Repeat the text."
    ids = chars.encode(text)
    assert len(ids) == len(text) and chars.decode(ids) == text
    assert len(bpe.encode(text)) < len(text)  # the merged one does merge
    # every character's id is the byte token's id in the merged vocabulary (same embedding rows)
    assert all(bpe.token_to_id(chars.id_to_token(i)) == i for i in ids)
    for t in REQUIRED:
        assert chars.encode(t) == [bpe.token_to_id(t)], t
    chars.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # the released layout (empty merges.txt) alone reproduces it
    assert Tokenizer.from_dir(tmp_path).encode(text) == ids


def test_save_is_readable_by_transformers_and_by_us(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.tiny()
    tok.save(tmp_path)
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json"):
        assert (tmp_path / f).is_file(), f
    again = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert hf.eos_token_id == tok.im_end_id and hf.pad_token_id == tok.pad_id
    assert hf.decode(tok.encode(TEXTS[9]), skip_special_tokens=True) == \
        tok.decode(tok.encode(TEXTS[9]), skip_special_tokens=True)


@pytest.mark.parametrize("drop", [("vocab.json", "merges.txt"), ("tokenizer.json",),
                                  ("tokenizer.json", "tokenizer_config.json")])
def test_saved_layouts_each_suffice(tmp_path, drop):
    # tokenizer.json alone; vocab+merges+tokenizer_config (released layout); vocab+merges+added_tokens.json only
    tok = Tokenizer.tiny()
    tok.save(tmp_path)
    for f in drop:
        (tmp_path / f).unlink()
    again = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text), text
    assert again.vocab_size == 512


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="needs tokenizer.json or vocab.json"):
        Tokenizer.from_dir(tmp_path)
    tok = Tokenizer.tiny()
    with pytest.raises(KeyError, match="no token"):
        tok.token_to_id("<not-a-token>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 512])
    with pytest.raises(TypeError):
        tok.encode(["a"])
    # an added token declared with an id that leaves a gap must be rejected, not silently renumbered
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["600"] = {"content": "<extra>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="<extra>.*600"):
        Tokenizer.from_dir(tmp_path)
    # a tokenizer without the chat/visual special tokens is rejected with their names
    cfg["added_tokens_decoder"] = {"0": {"content": "<unk>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "vocab.json").write_text(json.dumps({"<unk>": 0, "a": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="missing special token"):
        Tokenizer.from_dir(tmp_path)
