"""Parser-free document learning data: pages (synthetic, PDF, image+boxes JSONL) -> per-region corruption at three
visibility levels -> chat/SFT samples (JSONL + images). See reports/docs_data.md.

Modules: page (Page/Region + seeding), text (synthetic text), synthetic (Pillow renderer), pdf (pypdfium2),
jsonl (image + boxes input), corrupt (levels), samples (prompts/targets, writer), pipeline (parallel runs),
grid (tape pages for from-scratch models), contact (contact sheet), ocr (tesseract meter), cli.
"""

from vlmcook.data.docs.corrupt import LEVELS, CorruptConfig, Corrupted, corrupt_page
from vlmcook.data.docs.page import KINDS, Line, Page, Region, rngs, split_lines
from vlmcook.data.image import IMAGE_MARKER
from vlmcook.data.docs.samples import SampleConfig, box_tag, make_sample, norm_box, page_text

__all__ = ["IMAGE_MARKER", "KINDS", "LEVELS", "CorruptConfig", "Corrupted", "Line", "Page", "Region", "SampleConfig",
           "box_tag", "corrupt_page", "make_sample", "norm_box", "page_text", "rngs", "split_lines"]
