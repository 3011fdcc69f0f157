"""Image conversion (cooper_ros.image_codec): every encoding, step padding, byte order,
JPEG/PNG compressed input, and the errors for bad input. Uses real sensor_msgs messages."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 Python packages not installed (run scripts/setup.sh)")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from cooper_ros import image_codec as ic  # noqa: E402

RNG = np.random.default_rng(0)
H, W = 37, 53  # odd sizes on purpose


def _rand(dtype, shape):
    if np.dtype(dtype).kind == "f":
        return RNG.uniform(0.1, 20.0, size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def _padded(arr, encoding, pad, bigendian=False):
    """Hand-build an Image with `pad` bytes of row padding (and optional big-endian data)."""
    info = ic.encoding_info(encoding)
    a = arr.astype(info.dtype.newbyteorder(">" if bigendian else "<"))
    rows = a.reshape(a.shape[0], -1).view(np.uint8).reshape(a.shape[0], -1)
    padded = np.concatenate([rows, np.full((a.shape[0], pad), 0xAB, np.uint8)], axis=1)
    m = Image()
    m.height, m.width = a.shape[0], a.shape[1]
    m.encoding = encoding
    m.is_bigendian = int(bigendian)
    m.step = rows.shape[1] + pad
    m.data = padded.tobytes()
    return m


LOSSLESS = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16", "16UC1", "32FC1",
            "rgb16", "bgr16", "16SC1", "32SC1", "64FC1", "8UC3"]


@pytest.mark.parametrize("encoding", LOSSLESS)
def test_lossless_round_trip(encoding):
    info = ic.encoding_info(encoding)
    shape = (H, W) if info.channels == 1 else (H, W, info.channels)
    a = _rand(info.dtype, shape)
    msg = ic.array_to_image(a, encoding)
    assert isinstance(msg, Image)
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (H, W, encoding, 0)
    assert msg.step == W * info.pixel_bytes
    assert len(msg.data) == H * msg.step
    back = ic.image_to_array(msg)
    assert back.dtype == info.dtype and back.shape == shape
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("encoding", ["rgb8", "bgra8", "mono16", "32FC1", "16UC1"])
@pytest.mark.parametrize("pad", [1, 3, 64])
@pytest.mark.parametrize("bigendian", [False, True])
def test_step_padding_and_byte_order(encoding, pad, bigendian):
    info = ic.encoding_info(encoding)
    shape = (H, W) if info.channels == 1 else (H, W, info.channels)
    a = _rand(info.dtype, shape)
    m = _padded(a, encoding, pad, bigendian)
    np.testing.assert_array_equal(ic.image_to_array(m), a)


def test_last_row_padding_may_be_missing():
    a = _rand(np.uint8, (H, W, 3))
    m = _padded(a, "rgb8", 5)
    m.data = bytes(m.data)[:-5]
    np.testing.assert_array_equal(ic.image_to_array(m), a)


def test_to_rgb8_colour_orders():
    rgb = _rand(np.uint8, (H, W, 3))
    alpha = _rand(np.uint8, (H, W, 1))
    cases = {
        "rgb8": rgb, "bgr8": rgb[:, :, ::-1], "rgba8": np.concatenate([rgb, alpha], -1),
        "bgra8": np.concatenate([rgb[:, :, ::-1], alpha], -1), "8UC3": rgb[:, :, ::-1],
    }
    for enc, arr in cases.items():
        out = ic.image_to_rgb8(ic.array_to_image(arr, enc))
        assert out.dtype == np.uint8 and out.shape == (H, W, 3) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, rgb, err_msg=enc)


def test_to_rgb8_16bit_and_mono():
    rgb16 = _rand(np.uint16, (H, W, 3))
    out = ic.image_to_rgb8(ic.array_to_image(rgb16, "rgb16"))
    np.testing.assert_array_equal(out, np.round(rgb16 / 257.0).astype(np.uint8))
    m8 = _rand(np.uint8, (H, W))
    out = ic.image_to_rgb8(ic.array_to_image(m8, "mono8"))
    assert out.shape == (H, W, 3) and (out == m8[:, :, None]).all()
    m16 = np.array([[0, 257, 65535]], np.uint16)
    out = ic.image_to_rgb8(ic.array_to_image(m16, "mono16"))
    assert out[0, :, 0].tolist() == [0, 1, 255]


def test_depth_like_encodings_are_normalised_grey():
    d = np.linspace(0.5, 4.5, H * W, dtype=np.float32).reshape(H, W)
    out = ic.image_to_rgb8(ic.array_to_image(d, "32FC1"))
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    mm = (d * 1000).astype(np.uint16)
    out16 = ic.image_to_rgb8(ic.array_to_image(mm, "16UC1"))
    assert out16[0, 0, 0] == 0 and out16[-1, -1, 0] == 255
    flat = ic.image_to_rgb8(ic.array_to_image(np.full((4, 4), 2.0, np.float32), "32FC1"))
    assert (flat == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_float_image_refused(bad):
    d = np.ones((H, W), np.float32)
    d[3, 4] = bad
    with pytest.raises(ic.ImageConversionError, match="NaN/inf"):
        ic.image_to_rgb8(ic.array_to_image(d, "32FC1"))
    # the lossless layer keeps them (depth images use NaN for invalid)
    back = ic.image_to_array(ic.array_to_image(d, "32FC1"))
    assert np.array_equal(np.isnan(back), np.isnan(d))


def test_yuv422_and_bayer():
    # a flat colour in UYVY and YUYV decodes to the same RGB everywhere
    y, u, v = 120, 90, 200
    uyvy = np.tile(np.array([u, y, v, y], np.uint8), (H, W // 2 * 1)).reshape(H, (W // 2) * 4)
    w_even = (W // 2) * 2
    m = Image(height=H, width=w_even, encoding="yuv422", step=w_even * 2, data=uyvy.tobytes())
    out = ic.image_to_rgb8(m)
    assert out.shape == (H, w_even, 3) and (out == out[0, 0]).all()
    yuyv = uyvy.reshape(H, -1, 4)[..., [1, 0, 3, 2]].reshape(H, -1)
    m2 = Image(height=H, width=w_even, encoding="yuv422_yuy2", step=w_even * 2, data=yuyv.tobytes())
    np.testing.assert_array_equal(ic.image_to_rgb8(m2), out)
    # BT.601 full range: R = Y + 1.402 V', G = Y - 0.344 U' - 0.714 V', B = Y + 1.772 U'
    assert tuple(out[0, 0]) == (221, 82, 53)
    raw = np.zeros((H + 1, W + 1), np.uint8)
    raw[0::2, 0::2] = 200   # R
    raw[1::2, 1::2] = 50    # B
    raw[0::2, 1::2] = 100   # G
    raw[1::2, 0::2] = 100   # G
    bm = Image(height=H + 1, width=W + 1, encoding="bayer_rggb8", step=W + 1, data=raw.tobytes())
    out = ic.image_to_rgb8(bm)
    assert out.shape == (H + 1, W + 1, 3) and tuple(out[0, 0]) == (200, 100, 50)


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_compressed_round_trip(fmt):
    from cooper_ros.testing import pattern_frame

    rgb = pattern_frame(48, 64)
    msg = ic.encode_compressed(rgb, fmt)
    assert isinstance(msg, CompressedImage) and fmt in msg.format
    out = ic.decode_compressed(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    if fmt == "png":
        np.testing.assert_array_equal(out, rgb)
    else:
        assert np.abs(out.astype(int) - rgb).mean() < 6.0


def test_compressed_mono_and_16bit_png():
    from PIL import Image as PILImage
    import io

    g = _rand(np.uint8, (H, W))
    out = ic.decode_compressed(ic.encode_compressed(g, "png"))
    assert (out == g[:, :, None]).all()
    bio = io.BytesIO()
    PILImage.fromarray(np.arange(H * W, dtype=np.uint16).reshape(H, W)).save(bio, format="PNG")
    m = CompressedImage(format="16UC1; png compressed", data=bio.getvalue())
    out = ic.decode_compressed(m)
    assert out.shape == (H, W, 3) and out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


# ------------------------------------------------------------------ errors
def _msg(**kw):
    m = Image(height=4, width=4, encoding="rgb8", step=12, data=bytes(48))
    for k, v in kw.items():
        setattr(m, k, v)
    return m


@pytest.mark.parametrize("kw, match", [
    (dict(encoding="weird42"), "unsupported image encoding 'weird42'"),
    (dict(encoding=""), "unsupported image encoding"),
    (dict(data=bytes(47)), "data too short: 47 bytes"),
    (dict(height=0, width=0, step=0, data=b""), "empty image"),
    (dict(height=4, width=0), "empty image"),
    (dict(step=11), "step 11 is smaller"),
    (dict(height=8000, width=8000, step=24000, data=bytes(48)), "image too large: 8000x8000"),
    (dict(encoding="yuv422", width=3, step=6, data=bytes(24)), "even width"),
])
def test_bad_messages_give_clear_errors(kw, match):
    with pytest.raises(ic.ImageConversionError, match=match):
        ic.image_to_rgb8(_msg(**kw))


def test_size_limit_is_checked_before_data():
    # 8000 x 8000 with no data at all: refused for its size, data never read
    m = _msg(height=8000, width=8000, step=24000, data=b"")
    with pytest.raises(ic.ImageConversionError, match="too large"):
        ic.check_image_header(m, max_pixels=4096 * 4096)


def test_bad_compressed():
    with pytest.raises(ic.ImageConversionError, match="no data"):
        ic.decode_compressed(CompressedImage(format="jpeg", data=b""))
    with pytest.raises(ic.ImageConversionError, match="cannot decode"):
        ic.decode_compressed(CompressedImage(format="jpeg", data=b"not a jpeg at all"))
    big = ic.encode_compressed(np.zeros((300, 400, 3), np.uint8), "png")
    with pytest.raises(ic.ImageConversionError, match="too large"):
        ic.decode_compressed(big, max_pixels=1000)
    good = ic.encode_compressed(np.zeros((30, 40, 3), np.uint8), "jpeg")
    truncated = CompressedImage(format="jpeg", data=bytes(good.data)[:50])
    with pytest.raises(ic.ImageConversionError):
        ic.decode_compressed(truncated)


def test_array_to_image_refuses_wrong_shapes():
    with pytest.raises(ic.ImageConversionError, match="H x W x 3"):
        ic.array_to_image(np.zeros((4, 4), np.uint8), "rgb8")
    with pytest.raises(ic.ImageConversionError, match="dtype"):
        ic.array_to_image(np.zeros((4, 4), np.float32), "mono8")
