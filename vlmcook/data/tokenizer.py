"""Tokenizers: the released MiniCPM-V 4.5 one (Qwen2 byte-level BPE) and a tiny built-in one for tiny models.

Notable (docs/reference.md 8.1):
- `Tokenizer.from_dir` rebuilds the released tokenizer from `vocab.json` + `merges.txt` + the added tokens, with the
  same pieces as Qwen2's fast tokenizer: NFC normaliser, the Qwen2 split regex, byte-level BPE, no BOS ever. Ids
  are checked against the ones the files declare (`<unk>` = 128244 lives inside the BPE vocab; the 105 added
  tokens start at 151643), so a wrong file fails loudly instead of shifting ids.
- Special tokens written in text are recognised by `encode` (the chat template and placeholders rely on it).
  `<think>`, `</think>` and the tool tags are added but *not special*, as released: `skip_special_tokens` keeps them.
- `encode_text` is for what people write (message content): there an added token's string is only its characters,
  except the grounding tags (TEXT_TOKENS), so no text can open or close a turn or make a visual slot
  (docs/reliability.md, "Control tokens"). On text that spells no added token both encodes give the same ids.
- `Tokenizer.tiny()` loads `assets/tiny_tokenizer.json` (made by `assets/make_tiny_tokenizer.py`): 512 ids, the
  same special token strings, `<unk>` = 0, `<|endoftext|>` = 1 (pad, config bos), `<|im_end|>` = 2 (eos), so it
  fits the `tiny` preset's `vocab_size=512`, `bos_token_id=1`, `eos_token_id=2`. `Tokenizer.tiny(chars=True)` is
  the same vocabulary without merges (one token per character).
- The pad id is `<|endoftext|>` (the release's `pad_token`), not 0 = `!` (docs/reference.md 10.8).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

ASSETS = Path(__file__).resolve().parent / "assets"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Added tokens the release marks special=False (kept by skip_special_tokens); every other added token is special.
NOT_SPECIAL = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
# Every token string the chat template, the processor or generation needs; a tokenizer without one is rejected.
REQUIRED = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<image>", "</image>",
            "<slice>", "</slice>", "<image_id>", "</image_id>", "<ref>", "</ref>", "<box>", "</box>", "<quad>",
            "</quad>", "<point>", "</point>")
# Added tokens that message text may spell and get as tokens: the grounding tags the model reads and writes
# (`<ref>a dog</ref><box>x1 y1 x2 y2</box>`). Any other added token written in text stays plain characters.
TEXT_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>")
_TEXT_TOKENS = re.compile("(" + "|".join(map(re.escape, TEXT_TOKENS)) + ")")


class TokenizerError(ValueError):
    """Tokenizer files are missing, malformed, or disagree with each other."""


def qwen2_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Attach Qwen2's normaliser / pre-tokenizer / decoder to a byte-level BPE `tok` (in place)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` with the named ids vlmcook uses."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "tokenizer"):
        self.tok, self.source = tok, source
        missing = [t for t in REQUIRED if tok.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"{source}: missing special token(s) {missing}")
        tid = tok.token_to_id
        self.unk_id, self.endoftext_id = tid("<unk>"), tid("<|endoftext|>")
        self.im_start_id, self.im_end_id = tid("<|im_start|>"), tid("<|im_end|>")
        self.think_id, self.think_end_id = tid("<think>"), tid("</think>")
        self.image_start_id, self.image_end_id = tid("<image>"), tid("</image>")
        self.slice_start_id, self.slice_end_id = tid("<slice>"), tid("</slice>")
        self.image_id_start_id, self.image_id_end_id = tid("<image_id>"), tid("</image_id>")
        self.pad_id = self.endoftext_id  # a real pad token, never `!` (id 0 in the release)
        self.stop_ids = (self.im_end_id, self.endoftext_id)
        # The same pipeline without the added-token pass: the BPE alone, which never yields an added token (its
        # pre-tokenizer splits `<`, letters and `>` apart, so even `<unk>`, which sits in the BPE vocabulary,
        # cannot be formed). The model object is shared, not copied.
        self._bpe = tokenizers.Tokenizer(tok.model)
        self._bpe.normalizer, self._bpe.pre_tokenizer = tok.normalizer, tok.pre_tokenizer
        # Longest BPE piece, in bytes (byte-level: one character per byte): a text of B UTF-8 bytes is at least
        # B / (3 * this) tokens (NFC shrinks UTF-8 by at most 3x, Hangul jamo), so an absurd text can be refused
        # by its length before it is encoded (~0.6 us per character).
        self.max_piece_bytes = max(len(p) for p in self._bpe.get_vocab())

    # ---- construction ---------------------------------------------------------------------------------------
    @staticmethod
    def from_dir(path: str | Path) -> "Tokenizer":
        """A tokenizer.json if the folder has one (our `save` writes it), else the released layout: vocab.json +
        merges.txt + added tokens from tokenizer_config.json's `added_tokens_decoder` or added_tokens.json."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_file(path / "tokenizer.json")
        if not (path / "vocab.json").is_file() or not (path / "merges.txt").is_file():
            raise TokenizerError(f"{path}: needs tokenizer.json or vocab.json + merges.txt")
        try:
            model = BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt"), dropout=None, unk_token=None,
                                  continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                  byte_fallback=False)
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            raise TokenizerError(f"{path}: cannot read vocab.json/merges.txt ({e})") from None
        tok = qwen2_pipeline(tokenizers.Tokenizer(model))
        added = _read_added(path)
        if "<unk>" not in {c for _, c, _ in added} and model.token_to_id("<unk>") is not None:
            added.insert(0, (model.token_to_id("<unk>"), "<unk>", True))  # added_tokens.json omits it (in vocab)
        _add_tokens(tok, sorted(added), str(path))
        return Tokenizer(tok, str(path))

    @staticmethod
    def from_file(path: str | Path) -> "Tokenizer":
        try:
            return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), str(path))
        except Exception as e:
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{path}: cannot read tokenizer.json ({e})") from None

    @staticmethod
    def tiny(chars: bool = False) -> "Tokenizer":
        """The built-in 512-id tokenizer for tiny models (no download). `chars`: without its BPE merges, i.e. one
        token per byte (= per character of ASCII text), same ids; the demo reads pages with it (vlmcook/demo.py)."""
        if not chars:
            return Tokenizer.from_file(ASSETS / "tiny_tokenizer.json")
        spec = json.loads((ASSETS / "tiny_tokenizer.json").read_text(encoding="utf-8"))
        spec["model"]["merges"] = []
        return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)), "tiny tokenizer (characters)")

    @staticmethod
    def for_model(folder: str | Path | None, vocab_size: int) -> "Tokenizer":
        """The tokenizer of a model: `folder`'s own files (tokenizer.json or vocab.json + merges.txt), else the
        built-in tiny one when the model's vocab_size is its 512, else a FileNotFoundError saying what to add."""
        if folder is not None and any((Path(folder) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            return Tokenizer.from_dir(folder)
        tiny = Tokenizer.tiny()
        if tiny.vocab_size == vocab_size:
            return tiny
        where = f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)" if folder is not None \
            else "no tokenizer folder given"
        raise FileNotFoundError(f"{where} and the model's vocab_size {vocab_size} does not match the built-in tiny "
                                f"tokenizer's {tiny.vocab_size}; copy the released tokenizer files into the model "
                                f"folder or pass a tokenizer folder")

    # ---- use --------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids; special token strings in `text` become their ids; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Message text -> ids: the strings of added tokens (`<|im_start|>`, `<think>`, `<image>`, `<unk>`, ...) are
        encoded as the characters they spell, except the grounding tags of TEXT_TOKENS; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\\ud800" in JSON): tokenizers would raise TypeError
            raise ValueError(f"text is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                             f"{e.start}") from None
        ids: list[int] = []
        for k, piece in enumerate(_TEXT_TOKENS.split(text)):  # odd pieces are the tags themselves
            if k % 2:
                ids.append(self.tok.token_to_id(piece))
            elif piece:
                ids += self._bpe.encode(piece, add_special_tokens=False).ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.source}: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: no token {token!r}")
        return i

    def id_to_token(self, i: int) -> str:
        t = self.tok.id_to_token(i)
        if t is None:
            raise KeyError(f"{self.source}: no id {i}")
        return t

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (max id + 1)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- saving ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, vocab.json + merges.txt, added_tokens.json and a tokenizer_config.json that
        `transformers.AutoTokenizer` (class Qwen2Tokenizer) and `Tokenizer.from_dir` both read."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        self.tok.model.save(str(path))  # vocab.json + merges.txt
        added = self.tok.get_added_tokens_decoder()  # {id: AddedToken}; also those inside the BPE vocab (tiny)
        listed = {t.content: i for i, t in sorted(added.items())}
        (path / "added_tokens.json").write_text(json.dumps(listed, indent=2, ensure_ascii=False), encoding="utf-8")
        decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                            "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                   for i, t in sorted(added.items())}
        config = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
                  "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "errors": "replace",
                  "model_max_length": 131072, "split_special_tokens": False, "added_tokens_decoder": decoder}
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                    encoding="utf-8")


def _read_added(path: Path) -> list[tuple[int, str, bool]]:
    """(id, content, special) of every added token, from tokenizer_config.json or else added_tokens.json."""
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        decoder = json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder")
        if decoder:
            return sorted((int(i), d["content"], bool(d.get("special", True))) for i, d in decoder.items())
    added = path / "added_tokens.json"
    if not added.is_file():
        raise TokenizerError(f"{path}: no added tokens (tokenizer_config.json added_tokens_decoder or "
                             f"added_tokens.json)")
    d = json.loads(added.read_text(encoding="utf-8"))
    return sorted((int(i), t, t not in NOT_SPECIAL) for t, i in d.items())


def _add_tokens(tok: tokenizers.Tokenizer, added: list[tuple[int, str, bool]], source: str) -> None:
    """Add tokens in id order; each must land on its declared id (tokenizers appends new ones at the end)."""
    for i, content, special in added:
        at = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([at])
        got = tok.token_to_id(content)
        if got != i:
            raise TokenizerError(f"{source}: added token {content!r} declared with id {i} but landed on {got} "
                                 f"(ids must follow the BPE vocabulary without gaps)")
