"""Suite-wide setup: one torch thread, a fixed seed, and the released MiniCPM-V 4.5 files (`reference_dir`).

The released small files live in tests/fixtures/minicpm-v-4_5 (tests/fixtures/README.md says where they come from,
their licence, and how the tokenizer subset was cut), so a fresh clone runs every test with nothing beside it.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# the recipes/ scripts are not part of the package; their tests import them from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RELEASED_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "minicpm-v-4_5"
COPIED = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer_config.json",
          "added_tokens.json", "special_tokens_map.json", "model.safetensors.index.json")

# One thread: the tiny models gain nothing from more, and tests that start subprocesses (torchrun, tesseract, the
# server) would otherwise oversubscribe 2 cores, which slows small ops by an order of magnitude.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def write_released_layout(fixtures: Path, out: Path) -> Path:
    """The released folder layout (no weights) from the fixtures: the small files as released, plus vocab.json and
    merges.txt rebuilt from their subsets. Every id the subset drops is held by a filler token containing a space,
    which byte-level BPE can never produce, so the 105 added tokens land on their released ids (151643..151747)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copyfile(fixtures / name, out / name)
    vocab = json.loads((fixtures / "vocab_subset.json").read_text(encoding="utf-8"))
    size = json.loads((fixtures / "added_tokens.json").read_text(encoding="utf-8"))["<|endoftext|>"]  # 151643
    kept = set(vocab.values())
    vocab.update({f"<fixture gap {i}>": i for i in range(size) if i not in kept})
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(fixtures / "merges_subset.txt", out / "merges.txt")
    return out


@pytest.fixture(scope="session")
def reference_dir(tmp_path_factory) -> Path:
    """A released-layout folder built from tests/fixtures. `VLMCOOK_REFERENCE_DIR=<full released folder>` runs the
    same tests on the complete files instead (tests/fixtures/make_tokenizer_subset.py does, to record texts)."""
    full = os.environ.get("VLMCOOK_REFERENCE_DIR")
    if full:
        return Path(full)
    return write_released_layout(RELEASED_FIXTURES, tmp_path_factory.mktemp("minicpm-v-4_5"))
