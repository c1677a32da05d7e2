"""Image preprocessing: docs/reference.md 6 parity vectors (hand-derived numbers in docs/reference.md 11), pixels against an
independent re-statement of the released steps, slice order, normalisation, tiny and bad inputs."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmcook.data import image as im


def _rand_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- size rules ---------------------------------------------------------------------------------------------------
def test_ensure_divide_bankers_rounding():
    assert im.ensure_divide(483, 14) == 476  # 34.5 -> 34 (banker's), not 35
    assert im.ensure_divide(497, 14) == 504  # 35.5 -> 36
    assert im.ensure_divide(3, 14) == 14  # never below one patch
    assert im.ensure_divide(597.33, 14) == 602


def test_best_resize_truncates():
    # docs/reference.md 11.1: r = 1.667, H' = int(448 / 1.291) = 347, W' = int(578.3) = 578 -> 574 x 350
    assert im.best_resize((1000, 600)) == (574, 350)
    assert im.best_resize((448, 448)) == (448, 448)
    assert im.best_resize((224, 224)) == (224, 224)  # small and no upscale: kept
    assert im.best_resize((224, 224), upscale=True) == (448, 448)
    assert im.best_resize((100, 1000), upscale=True) == (140, 1414)  # vector 8: H' = 1416, W' = 141


@pytest.mark.parametrize("size, grid, views, tgt0, tgt1, n_views", [
    ((1000, 600), (2, 1), ((574, 350), (406, 490)), (25, 41), (35, 29), 3),  # vector 1
    ((448, 448), None, ((448, 448),), (32, 32), None, 1),  # vector 2
    ((224, 224), None, ((448, 448),), (32, 32), None, 1),
    ((1920, 1080), (4, 2), ((602, 336), (420, 476)), (24, 43), (34, 30), 9),  # vector 3
    ((600, 1000), (1, 2), ((350, 574), (490, 406)), (41, 25), (29, 35), 3),  # vector 5
    ((4032, 3024), (3, 3), ((518, 392), (518, 392)), (28, 37), (28, 37), 10),  # vector 6
    ((100, 1000), None, ((140, 1414),), (101, 10), None, 1),  # vector 8
])
def test_layout_parity_vectors(size, grid, views, tgt0, tgt1, n_views):
    lay = im.image_layout(size)
    assert lay.grid == grid
    assert lay.view_sizes[:2] == views
    assert lay.n_views == n_views
    assert lay.tgt_sizes[0] == tgt0
    if tgt1:
        assert lay.tgt_sizes[1] == tgt1
    if grid:  # refine size = cells * grid; vector 1 refine 812 x 490, vector 3 1680 x 952, vector 6 1554 x 1176
        assert im.refine_size(size, grid) == (views[1][0] * grid[0], views[1][1] * grid[1])


def test_refine_sizes_from_spec():
    assert im.refine_size((1000, 600), (2, 1)) == (812, 490)
    assert im.refine_size((1920, 1080), (4, 2)) == (1680, 952)
    assert im.refine_size((4032, 3024), (3, 3)) == (1554, 1176)


def test_grid_choice_details():
    assert im.slice_grid((1920, 1080), max_slice_nums=1) is None  # vector 3 with max_slice_nums=1
    assert im.image_layout((1920, 1080), max_slice_nums=1).view_sizes == ((602, 336),)
    # 600x600: multiple 2 -> counts {2, 3}; [1,2] and [2,1] tie at ln 2: the first ([1,2] = 1 col, 2 rows) wins
    assert im.slice_grid((600, 600)) == (1, 2)
    # 4032x3024: [3,3] (err 0.288) beats [4,2] (0.405)
    assert im.slice_grid((4032, 3024)) == (3, 3)
    with pytest.raises(ValueError, match="max_slice_nums"):
        im.slice_grid((100, 100), max_slice_nums=0)


def test_every_view_is_patch_aligned_and_bounded():
    rng = np.random.default_rng(1)
    for _ in range(300):
        w, h = (int(x) for x in rng.integers(1, 5000, 2))
        lay = im.image_layout((w, h))
        assert 1 <= lay.n_views <= 10
        assert all(vw % 14 == 0 and vh % 14 == 0 and vw >= 14 and vh >= 14 for vw, vh in lay.view_sizes)
        if lay.grid:
            assert lay.n_views == 1 + lay.grid[0] * lay.grid[1] and lay.grid[0] * lay.grid[1] <= 9


# ---- pixels -------------------------------------------------------------------------------------------------------
def _reference_views(img, scale=448, max_slice=9):
    """Independent re-statement of the released steps (docs/reference.md 6.3): resize source, resize refine, crop in Python
    loops, float32 /255, (x - 0.5) / 0.5, channels first."""
    grid = im.slice_grid(img.size, scale, max_slice)
    out = []
    if grid is None:
        out.append(img.resize(im.best_resize(img.size, scale, 14, upscale=True), Image.Resampling.BICUBIC))
    else:
        out.append(img.copy().resize(im.best_resize(img.size, scale, 14), Image.Resampling.BICUBIC))
        refined = img.resize(im.refine_size(img.size, grid, scale, 14), Image.Resampling.BICUBIC)
        cw, ch = refined.width // grid[0], refined.height // grid[1]
        for top in range(0, refined.height, ch):
            for left in range(0, refined.width, cw):
                out.append(refined.crop((left, top, left + cw, top + ch)))
    mean = std = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    return [torch.from_numpy(((np.asarray(v).astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1).copy())
            for v in out]


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (448, 448), (30, 50), (1344, 1344), (1100, 300)])
def test_views_bit_exact_vs_restatement(size):
    img = _rand_image(*size, seed=size[0])
    got = im.preprocess_image(img)
    want = _reference_views(img)
    assert len(got.views) == len(want)
    for g, w in zip(got.views, want):
        assert g.dtype == torch.float32 and g.is_contiguous()
        assert torch.equal(g, w)
    assert [tuple(v.shape[1:]) for v in got.views] == [(14 * h, 14 * w) for h, w in got.tgt_sizes]


def test_normalisation_values():
    img = Image.new("RGB", (448, 448), (0, 255, 128))
    v = im.normalize(img)
    assert v.shape == (3, 448, 448)
    assert v[0].eq(-1).all() and v[1].eq(1).all()
    assert v[2, 0, 0].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-6)


def test_slices_are_row_major():
    # 4032x3024 -> 3x3 grid; paint each cell a distinct colour and find it at the centre of the matching slice.
    colours = [(28 * k, 255 - 25 * k, (70 * k) % 256) for k in range(9)]
    a = np.zeros((3024, 4032, 3), np.uint8)
    for r in range(3):
        for c in range(3):
            a[r * 1008:(r + 1) * 1008, c * 1344:(c + 1) * 1344] = colours[3 * r + c]
    got = im.preprocess_image(Image.fromarray(a))
    assert got.layout.grid == (3, 3)
    for k, view in enumerate(got.views[1:]):
        centre = view[:, view.shape[1] // 2, view.shape[2] // 2]
        want = torch.tensor(colours[k], dtype=torch.float32) / 255 * 2 - 1
        assert torch.allclose(centre, want, atol=0.02), k


def test_portrait_two_rows_top_then_bottom():
    a = np.zeros((1000, 600, 3), np.uint8)
    a[500:] = 255  # bottom half white
    got = im.preprocess_image(Image.fromarray(a))
    assert got.layout.grid == (1, 2)
    assert got.views[1].mean() < -0.9 and got.views[2].mean() > 0.9


@pytest.mark.parametrize("size", [(1, 1), (1, 3), (3, 1), (2, 2), (3, 3), (1, 500), (700, 2)])
def test_tiny_sides_work(size):
    # The release infers the channel layout from array shapes and breaks on 1- and 3-px sides (docs/reference.md 10.18).
    for src in (_rand_image(*size), np.zeros((size[1], size[0], 3), np.uint8), np.zeros((size[1], size[0]), np.uint8)):
        got = im.preprocess_image(src)
        assert got.views and all(v.shape[0] == 3 and v.shape[1] % 14 == 0 and v.shape[2] % 14 == 0
                                  for v in got.views)


def test_modes_converted_like_pil():
    base = _rand_image(64, 48)
    rgba = base.copy()
    rgba.putalpha(0)  # alpha dropped, not composited
    assert torch.equal(im.preprocess_image(rgba).views[0], im.preprocess_image(base).views[0])
    grey = base.convert("L")
    v = im.preprocess_image(grey).views[0]
    assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])
    pal = base.convert("P")
    assert torch.equal(im.preprocess_image(pal).views[0], im.preprocess_image(pal.convert("RGB")).views[0])
    deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))  # 16-bit white stays white
    assert im.preprocess_image(deep).views[0].eq(1).all()


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sources_path_bytes_array(tmp_path):
    img = _rand_image(300, 200)
    path = tmp_path / "x.png"
    img.save(path)
    want = im.preprocess_image(img).views[0]
    for src in (path, str(path), _png_bytes(img), np.asarray(img)):
        assert torch.equal(im.preprocess_image(src).views[0], want)
        assert im.image_size(src) == (300, 200)


def test_exif_orientation_applied_to_files():
    img = _rand_image(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    assert im.image_size(data) == (200, 300)
    assert im.load_image(data).size == (200, 300)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_inputs_name_the_source(tmp_path):
    with pytest.raises(im.ImageError, match="image bytes .*not an image"):
        im.load_image(b"definitely not an image")
    with pytest.raises(im.ImageError, match="missing.png.*no such file"):
        im.load_image(tmp_path / "missing.png")
    with pytest.raises(im.ImageError, match="object of type int"):
        im.load_image(42)
    with pytest.raises(im.ImageError, match="uint8"):
        im.load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(im.ImageError, match="channels last"):
        im.load_image(np.zeros((3, 4, 4, 2), np.uint8))
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(im.ImageError, match="notes.txt"):
        im.load_image(txt)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt, tmp_path):
    buf = io.BytesIO()
    _rand_image(400, 300).save(buf, format=fmt)
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(im.ImageError, match="truncated|corrupt"):
        im.load_image(data)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data)
    with pytest.raises(im.ImageError, match=f"cut.{fmt.lower()}"):
        im.preprocess_image(path)


def _bomb_png(w, h):
    """A valid PNG header claiming w x h pixels (the data is a single tiny IDAT: decoding would fail, but the
    size check must refuse it before decoding)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header():
    for w, h in ((20_000, 20_000), (100_000, 100_000)):  # above our limit; the second is above PIL's own
        with pytest.raises(im.ImageError, match="decompression bomb"):
            im.load_image(_bomb_png(w, h))
        with pytest.raises(im.ImageError, match="decompression bomb"):
            im.image_size(_bomb_png(w, h))


# ---- placeholder text ---------------------------------------------------------------------------------------------
def test_placeholder_text():
    u = "<unk>" * 64
    assert im.image_placeholder(None, 64) == f"<image>{u}</image>"
    assert im.image_placeholder((2, 1), 64, 0) == f"<image_id>0</image_id><image>{u}</image><slice>{u}</slice>" \
                                                  f"<slice>{u}</slice>"
    # one newline between rows, none after </image> (vector 5: 600x1000 -> 1 col x 2 rows)
    assert im.image_placeholder((1, 2), 64, 12) == f"<image_id>12</image_id><image>{u}</image><slice>{u}</slice>\n" \
                                                   f"<slice>{u}</slice>"
    three = im.image_placeholder((3, 3), 8)
    assert three.count("\n") == 2 and three.count("<unk>") == 80
