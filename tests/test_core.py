"""The core library without Ray: preprocessing, data split, model loading, export, metrics."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr.config import CLASSES, PreprocessConfig, TrainConfig, from_dict, resolve_train_config, to_dict
from cxr.data import Sample, discover, patient_id_from_name, split_by_patient, val_folds
from cxr.errors import CxrError, ImageError
from cxr.export import load_export, read_metadata, save_export, ModelMetadata
from cxr.metrics import binary_metrics, decide, threshold_for_sensitivity
from cxr.model import build_model
from cxr.preprocess import decode_image, detect_format, image_size_of, preprocess
from cxr.training import LoadedImages, XrayDataset, check_loaded, load_images, merge_epoch_stats

CFG = PreprocessConfig(image_size=64)


def _jpeg_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ----------------------------------------------------------------- one preprocessing path


def test_training_eval_path_equals_inference_path(sample_images: list[Path]) -> None:
    """The tensors the training job validates on are the tensors screening/serving score."""
    paths = [str(p) for p in sample_images]
    images = load_images(paths, [0] * len(paths), CFG.max_pixels)
    dataset = XrayDataset(images, CFG)  # training's eval path (no augment)
    for i, p in enumerate(paths):
        train_tensor, _ = dataset[i]
        serve_tensor = preprocess(Path(p).read_bytes(), CFG)  # screen/serve path
        assert train_tensor.shape == (1, 64, 64)
        assert np.array_equal(train_tensor.numpy(), serve_tensor)


def test_resize_equals_torch_antialiased_bilinear() -> None:
    """Preprocessing resizes with PIL (no torch in decode workers); it equals torch's antialiased
    bilinear interpolate, which models trained before the switch saw, within 3e-5."""
    import torch.nn.functional as F

    from cxr.preprocess import resize_square

    rng = np.random.default_rng(0)
    for h, w, size in ((1000, 800, 224), (100, 120, 224), (300, 64, 64)):
        img = rng.random((h, w), dtype=np.float32)
        ref = F.interpolate(torch.from_numpy(img)[None, None], size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)[0, 0].numpy()
        got = resize_square(img, size)
        assert got.shape == (size, size) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=3e-5)


def test_augment_is_torchvisions_transforms_applied_by_pil(sample_images: list[Path]) -> None:
    """Training augmentation draws torchvision's parameters from the same generator and applies them with
    PIL: with one seed it gives what RandomResizedCrop + RandomAffine on a tensor give (the recipe the
    CPU preset was tuned with), only faster; and different seeds give different images."""
    from torchvision.transforms import v2

    from cxr.config import AugmentConfig
    from cxr.preprocess import make_train_augment

    aug_cfg = AugmentConfig(contrast=0.0, brightness=0.0)
    augment = make_train_augment(aug_cfg)
    img = decode_image(sample_images[0].read_bytes())[None]
    for seed in range(5):
        torch.manual_seed(seed)
        ref = v2.RandomResizedCrop(96, scale=(aug_cfg.scale_min, 1.0), ratio=(aug_cfg.ratio_min, aug_cfg.ratio_max),
                                   antialias=True)(torch.from_numpy(img))
        ref = v2.RandomAffine(degrees=aug_cfg.rotate_deg, translate=(aug_cfg.translate, aug_cfg.translate))(ref)
        torch.manual_seed(seed)
        got = augment(img, 96)
        assert got.shape == (1, 96, 96) and got.dtype == np.float32
        assert np.abs(got - ref.numpy()).mean() < 1e-3
    torch.manual_seed(0)
    first = augment(img, 96)
    assert np.abs(augment(img, 96) - first).mean() > 1e-2


def test_16bit_png_matches_8bit_source(sample_images: list[Path]) -> None:
    """16-bit data is scaled by its depth, not clipped: an 8->16-bit copy decodes to the same values."""
    src = Image.open(sample_images[0]).convert("L")
    a8 = np.asarray(src, dtype=np.uint16)
    png16 = _png(Image.fromarray((a8 * 257).astype(np.uint16)))
    assert Image.open(io.BytesIO(png16)).mode.startswith("I")
    np.testing.assert_allclose(decode_image(png16), a8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(preprocess(png16, CFG), preprocess(_png(src), CFG), atol=1e-5)


@pytest.mark.parametrize("bits", [12, 10])
def test_16bit_png_of_fewer_stored_bits_reads_like_its_source(sample_images: list[Path], bits: int) -> None:
    """12-bit detector data in a 16-bit PNG (a DICOM export) is not read as a near-black 16-bit image."""
    a8 = np.asarray(Image.open(sample_images[0]).convert("L"), dtype=np.float64)
    stored = np.round(a8 / 255.0 * (2**bits - 1)).astype(np.uint16)
    png = _png(Image.fromarray(stored))
    np.testing.assert_allclose(decode_image(png), a8 / 255.0, atol=0.5 / (2**bits - 1) + 1e-6)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "CMYK", "LA", "P"])
def test_colour_modes_reduce_to_the_same_gray(sample_images: list[Path], mode: str) -> None:
    gray = Image.open(sample_images[1]).convert("L")
    converted = gray.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    converted.save(buf, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    got = decode_image(buf.getvalue())
    tol = 0.04 if fmt == "JPEG" else 1.5 / 255  # CMYK JPEG is lossy; P is an 8-bit palette
    assert got.shape == gray.size[::-1]
    assert np.abs(got - np.asarray(gray) / 255.0).mean() < tol


def test_exif_orientation_is_applied(sample_images: list[Path]) -> None:
    img = Image.open(sample_images[2]).convert("L").crop((0, 0, 224, 160))  # not square: rotation visible
    rotated = img.transpose(Image.Transpose.ROTATE_90)  # stored rotated, EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", quality=100, exif=exif.tobytes())
    got = decode_image(buf.getvalue())
    assert got.shape == (160, 224)
    assert np.abs(got - np.asarray(img) / 255.0).mean() < 0.02


def test_dicom_matches_source(sample_images: list[Path], make_dicom) -> None:
    """MONOCHROME2 16-bit and MONOCHROME1 (inverted) DICOM decode to the source pixels."""
    a8 = np.asarray(Image.open(sample_images[3]).convert("L"), dtype=np.uint16)
    mono2 = make_dicom(a8 * 257, "MONOCHROME2")
    mono1 = make_dicom(65535 - a8 * 257, "MONOCHROME1")
    assert detect_format(mono2) == "dicom"
    np.testing.assert_allclose(decode_image(mono2), a8 / 255.0, atol=1e-6)
    np.testing.assert_allclose(decode_image(mono1), a8 / 255.0, atol=1e-6)
    bare = mono2[132:]  # no preamble and no 'DICM' (older PACS exports): still a DICOM, by content
    assert detect_format(bare) == "dicom"
    np.testing.assert_allclose(decode_image(bare), a8 / 255.0, atol=1e-6)
    assert image_size_of(bare) == image_size_of(mono2) == (a8.shape[1], a8.shape[0])  # the row's width, height


@pytest.mark.parametrize(
    "name,make,code",
    [
        ("empty", lambda j: b"", "empty"),
        ("text", lambda j: b"hello, this is not an image at all" * 10, "not_image"),
        ("truncated", lambda j: j[: len(j) // 2], "truncated"),
        ("corrupt", lambda j: j[:4] + bytes(200) + j[204:], "corrupt"),
        ("garbage_dicom", lambda j: bytes(128) + b"DICM" + b"\x00garbage" * 20, "dicom_invalid"),
        ("nan_tiff", lambda j: _nan_tiff(j), "corrupt"),  # a NaN pixel once made the whole image black
        ("unidentified", lambda j: j[:3] + b"\x00" * 17, "corrupt"),
    ],
)
def test_bad_inputs_raise_typed_errors(sample_images: list[Path], name: str, make, code: str) -> None:
    data = make(sample_images[0].read_bytes())
    with pytest.raises(ImageError) as err:
        preprocess(data, CFG)
    assert err.value.code == code, (name, str(err.value))
    assert "\n" not in str(err.value) and "object at 0x" not in str(err.value)  # one line, about the file


def _nan_tiff(jpeg: bytes) -> bytes:
    arr = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float32)
    arr[0, 0] = np.nan
    buf = io.BytesIO()
    Image.fromarray(arr, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _png(Image.new("L", (12_000, 12_000)), optimize=True)  # ~100 kB file, 144 Mpx
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError) as err:
        decode_image(bomb, max_pixels=64_000_000)
    assert err.value.code == "too_large"


def test_corrupt_training_images_are_skipped_and_counted(tmp_path: Path, sample_images: list[Path]) -> None:
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not a jpeg")
    loaded: LoadedImages = load_images([str(sample_images[0]), str(bad)], [0, 1], CFG.max_pixels)
    assert len(loaded.data) == 1 and loaded.skipped == {"not_image": [str(bad)]}


# ----------------------------------------------------------------- data and split


def test_discover_and_patient_split(data_dir: Path) -> None:
    samples = discover(data_dir)
    assert len(samples) == 5216
    train, val = split_by_patient(samples, 0.15, seed=7)
    assert not {s.patient_id for s in train} & {s.patient_id for s in val}
    assert 0.10 < len(val) / len(samples) < 0.20
    assert {s.label for s in val} == {"normal", "pneumonia"}
    # seeded: same split again, different seed gives another
    assert [s.path for s in split_by_patient(samples, 0.15, seed=7)[1]] == [s.path for s in val]
    assert [s.path for s in split_by_patient(samples, 0.15, seed=8)[1]] != [s.path for s in val]


def test_default_kaggle_split_is_unchanged(data_dir: Path) -> None:
    """The validation set of the documented runs (seed 42, 0.15; BENCHMARKS.md) is pinned."""
    import hashlib

    val = split_by_patient(discover(data_dir), 0.15, seed=42)[1]
    names = "\n".join(f"{Path(s.path).parent.name}/{Path(s.path).name}" for s in val)
    assert len(val) == 746
    assert hashlib.sha256(names.encode()).hexdigest() == "f110bcf575bf6fde5881cc3acf9046906be40050ddd1c442d66a9e1375500e8f"


def test_patients_with_films_of_both_labels_stay_on_one_side() -> None:
    labels = ("normal", "pneumonia")
    samples = [Sample(f"/d/mixed{i}_{label}.jpeg", label, label, f"mixed{i}") for i in range(20) for label in labels]
    samples += [Sample(f"/d/p{i}.jpeg", labels[i % 2], labels[i % 2], f"p{i}") for i in range(40)]
    for seed in range(5):
        train, val = split_by_patient(samples, 0.2, seed)
        assert not {s.patient_id for s in train} & {s.patient_id for s in val}
        assert len(train) + len(val) == len(samples)


def test_val_fraction_is_the_nearest_fold() -> None:
    assert [val_folds(f) for f in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.45)] == [10, 7, 5, 4, 3, 3, 2]
    samples = [Sample(f"/d/p{i}.jpeg", ("normal", "pneumonia")[i % 2], "x", f"p{i}") for i in range(60)]
    assert len(split_by_patient(samples, 0.4, seed=0)[1]) == 20  # 1/3, not 1/2
    with pytest.raises(CxrError, match="val fraction"):
        val_folds(0.5)


def test_manifest_with_a_byte_order_mark(tmp_path: Path, sample_images: list[Path]) -> None:
    """Excel's "CSV UTF-8" starts with a BOM, which must not become part of the first column's name."""
    rows = ["path,label,patient_id"] + [f"{p},{p.parent.name},pt{i}" for i, p in enumerate(sample_images)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8-sig")
    samples = discover(tmp_path / "manifest.csv")
    assert len(samples) == len(sample_images) and samples[0].patient_id.startswith("pt")


def test_data_uri_is_a_clear_error() -> None:
    with pytest.raises(CxrError, match="mounted at the same path on every node"):
        discover("s3://bucket/manifest.parquet")


def test_kaggle_layout_and_subtypes(tmp_path: Path, sample_images: list[Path]) -> None:
    for p in sample_images:
        dest = tmp_path / "train" / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    samples = discover(tmp_path)
    assert len(samples) == len(sample_images)
    assert {s.subtype for s in samples} <= {"normal", "bacteria", "virus"}
    assert patient_id_from_name("person1_bacteria_1.jpeg") == "person1"
    assert patient_id_from_name("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"


def test_unknown_labels_and_missing_data_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="data not found"):
        discover(tmp_path / "nope")
    (tmp_path / "train" / "COVID").mkdir(parents=True)
    with pytest.raises(CxrError, match="unknown label 'COVID'"):
        discover(tmp_path)
    (tmp_path / "train" / "COVID").rmdir()
    with pytest.raises(CxrError, match="no images"):
        discover(tmp_path)


# ----------------------------------------------------------------- model, weights, export


def test_pretrained_path_loads_a_torchvision_state_dict(tmp_path: Path) -> None:
    """The real loading path: an RGB ImageNet-style state_dict is folded to one channel, head replaced."""
    from torchvision.models import resnet50

    torch.manual_seed(1)
    reference = resnet50(weights=None)  # 3-channel conv1, 1000-class fc: the shape of ImageNet weights
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(2, str(path))
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.fc.out_features == 2
    # gray replicated to RGB through the reference == gray through the folded stem
    x = torch.rand(1, 1, 64, 64)
    ref_stem = reference.conv1(x.expand(-1, 3, -1, -1))
    assert torch.allclose(model.conv1(x), ref_stem, atol=1e-5)


def test_unreadable_weights_and_offline_imagenet_fail_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CxrError, match="is not a PyTorch weights file"):
        build_model(2, str(bad))
    # a torch file that pickles more than tensors: refused (never unpickled), without torch's advice to
    # load it with weights_only=False, in one line
    torch.save({"conv1.weight": torch.zeros(1), "hook": Path("x")}, bad)
    with pytest.raises(CxrError, match=r"cannot read .* as a state_dict \(torch.load\(weights_only=True\) refused") as err:
        build_model(2, str(bad))
    message = str(err.value)
    assert "weights_only=False" not in message and "set to `False`" not in message and "\n" not in message
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(CxrError, match="not a ResNet-50"):
        build_model(2, str(tmp_path / "other.pth"))
    with pytest.raises(CxrError, match="neither"):
        build_model(2, str(tmp_path / "missing.pth"))
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")  # used to be torch's page-long RuntimeError
    with pytest.raises(CxrError, match=r"not a ResNet-50 state_dict \(\d+ tensors of other shapes"):
        build_model(2, str(tmp_path / "r18.pth"))
    save_export(tmp_path / "export", build_model(2), ModelMetadata(classes=["normal", "pneumonia"]), graphs=False)
    assert torch.equal(build_model(2, str(tmp_path / "export")).conv1.weight,  # an export of ours: its weights
                       torch.load(tmp_path / "export" / "weights.pt")["conv1.weight"])
    # a training script's checkpoint around the weights ({"model": ..., "epoch": ...})
    sd = torch.load(tmp_path / "export" / "weights.pt")
    torch.save({"model": sd, "epoch": torch.tensor(3)}, tmp_path / "ckpt.pth")
    assert torch.equal(build_model(2, str(tmp_path / "ckpt.pth")).conv1.weight, sd["conv1.weight"])
    # a run folder, or one of its checkpoints, instead of the run's export: said which to give
    (tmp_path / "run").mkdir()
    (tmp_path / "export").rename(tmp_path / "run" / "model")
    with pytest.raises(CxrError, match="is a training run; its exported model is .*run/model"):
        build_model(2, str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoint_1").mkdir()
    torch.save({"model": sd}, tmp_path / "run" / "checkpoint_1" / "state.pt")
    with pytest.raises(CxrError, match="is a training checkpoint"):
        build_model(2, str(tmp_path / "run" / "checkpoint_1" / "state.pt"))


def test_train_output_uri_is_refused_not_made_a_local_folder(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from cxr.cli import main

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["train", "--data", str(data_dir), "--output", "s3://bucket/runs/r1", "--preset", "tiny"])
    assert res.exit_code == 2 and "--output must be a folder path" in res.output and "--storage" in res.output, res.output
    assert not list(tmp_path.iterdir())  # nothing written where Path("s3://...") would have put it


def test_offline_imagenet_is_one_line_from_the_cli(tmp_path: Path, data_dir: Path) -> None:
    env = {"HOME": str(tmp_path), "TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "-c", "from cxr.cli import main; main()", "train", "--data", str(data_dir), "--output",
                           str(tmp_path / "run"), "--preset", "tiny", "--pretrained", "imagenet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "ImageNet weights" in lines[0] and "--pretrained" in lines[0]


def test_a_model_path_that_is_not_an_export_says_what_it_is(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="model not found"):
        read_metadata(tmp_path / "nowhere")
    save_export(tmp_path / "run" / "model", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]),
                                                                                 preprocess=CFG))
    with pytest.raises(CxrError, match=r"is a training run; its model export is .*run/model"):
        read_metadata(tmp_path / "run")
    with pytest.raises(CxrError, match="is not a cxr model export"):
        read_metadata(tmp_path)


def test_export_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(3).eval()
    meta = save_export(tmp_path / "m", model, ModelMetadata(classes=list(CLASSES["subtype"]), task="subtype",
                                                            preprocess=CFG, threshold=0.3), graphs=False)
    assert len(meta.model_id) == 64
    loaded, meta2 = load_export(tmp_path / "m")
    assert meta2.classes == ["normal", "bacteria", "virus"] and meta2.preprocess == CFG and meta2.threshold == 0.3
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    on_disk = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert {"classes", "preprocess", "threshold", "model_id", "data_fingerprint", "val_metrics", "versions"} <= set(on_disk)
    (tmp_path / "m" / "weights.pt").write_bytes((tmp_path / "m" / "weights.pt").read_bytes() + b"x")
    with pytest.raises(CxrError, match="sha256"):
        load_export(tmp_path / "m")
    with pytest.raises(CxrError, match="not a cxr model export"):
        read_metadata(tmp_path)


def test_engines_agree_and_name_themselves(tmp_path: Path) -> None:
    """ONNX Runtime and PyTorch fp32 agree to 1e-4; bf16 autocast stays within bf16 rounding."""
    from cxr.engine import load_engine

    torch.manual_seed(0)
    save_export(tmp_path / "m", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    x = np.random.default_rng(0).standard_normal((3, 1, CFG.image_size, CFG.image_size), dtype=np.float32)
    engines = {name: load_engine(tmp_path / "m", name) for name in ("onnx", "torch", "torch-bf16")}
    assert {n: e.name for n, e in engines.items()} == {"onnx": "onnx", "torch": "torch", "torch-bf16": "torch-bf16"}
    probs = {n: e.predict_proba(x) for n, e in engines.items()}
    np.testing.assert_allclose(probs["torch"], probs["onnx"], atol=1e-4)
    np.testing.assert_allclose(probs["torch-bf16"], probs["torch"], atol=3e-2)
    assert not np.array_equal(probs["torch-bf16"], probs["torch"])  # autocast really ran in bf16
    with pytest.raises(CxrError, match="unknown engine"):
        load_engine(tmp_path / "m", "tensorrt")
    if not torch.cuda.is_available():  # a worker Ray gave a GPU that torch cannot see must not score on the CPU
        with pytest.raises(CxrError, match="given a GPU, but torch"):
            load_engine(tmp_path / "m", "auto", gpu=True)
    # a worker Ray gave no GPU stays on the CPU, even where it sees the node's GPUs (Ray >= 2.60 hides none)
    cpu_only = load_engine(tmp_path / "m", "torch", gpu=False)
    assert cpu_only.device.type == "cpu" and not cpu_only.bf16
    assert load_engine(tmp_path / "m", "auto", gpu=False).name in ("onnx", "torch-bf16")


def test_an_onnx_graph_of_other_weights_is_never_run_under_this_model_id(tmp_path: Path) -> None:
    """An export interrupted between its files (or a copy mixing two) left an old model.onnx beside new
    weights: the engine rebuilds it from the weights, and `cxr screen` refuses it in one line."""
    from cxr.engine import OnnxEngine, load_engine, onnx_model_id
    from cxr.export import check_export

    torch.manual_seed(0)
    meta_a = save_export(tmp_path / "a", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    save_export(tmp_path / "b", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    assert onnx_model_id(OnnxEngine(tmp_path / "a").session) == meta_a.model_id
    (tmp_path / "b" / "model.onnx").write_bytes((tmp_path / "a" / "model.onnx").read_bytes())  # a's graph, b's weights
    with pytest.raises(CxrError, match="exported from other weights"):
        check_export(str(tmp_path / "b"), "onnx")
    x = np.random.default_rng(0).standard_normal((2, 1, CFG.image_size, CFG.image_size), dtype=np.float32)
    engine = OnnxEngine(tmp_path / "b")
    np.testing.assert_allclose(engine.predict_proba(x), load_engine(tmp_path / "b", "torch").predict_proba(x), atol=1e-4)
    assert onnx_model_id(engine.session) == engine.meta.model_id != meta_a.model_id
    check_export(str(tmp_path / "b"), "onnx")  # rebuilt: accepted


def test_onnx_on_a_gpu_machine_without_onnxruntime_gpu_says_it_runs_on_the_cpu(tmp_path: Path, caplog) -> None:
    """The plain onnxruntime wheel on a GPU node (as on the lent H200) falls back to the CPU: it must say so."""
    import onnxruntime

    from cxr.engine import _ort_session

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    save_export(tmp_path / "m", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    with caplog.at_level("WARNING", logger="cxr"):
        session = _ort_session(tmp_path / "m" / "model.onnx", threads=1, gpu=True)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text and "onnxruntime-gpu" in caplog.text


def _score_in_fresh_process(model_dir: Path, backend: str, x: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, set[str]]:
    """Preprocess an odd-sized PNG and load ``backend`` in a new interpreter (as a decode worker, an actor or a
    replica does), score ``x`` and resolve ``auto``; returns the probabilities and which of torch /
    torchvision that imported."""
    np.save(tmp_path / "x.npy", x)
    png = tmp_path / "odd.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 70), dtype=np.uint8)).save(png)
    script = ("import sys, numpy as np; from cxr.engine import load_engine, resolve_backend; "
              "from cxr.config import PreprocessConfig; from cxr.preprocess import preprocess; "
              f"assert preprocess(open({str(png)!r}, 'rb').read(), PreprocessConfig(image_size=64)).shape == (1, 64, 64); "
              f"e = load_engine({str(model_dir)!r}, {backend!r}, threads=1); "
              f"np.save({str(tmp_path / 'p.npy')!r}, e.predict_proba(np.load({str(tmp_path / 'x.npy')!r}))); "
              "resolve_backend('auto'); print(*(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return np.load(tmp_path / "p.npy"), set(out.split())


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torch_engine_runs_the_torchscript_graph_without_torchvision(tmp_path: Path) -> None:
    """The export's TorchScript graph scores like the weights and loads without torchvision (fast actor
    and replica start); a graph traced from other weights is replaced, not trusted."""
    from cxr.engine import export_torchscript

    torch.manual_seed(0)
    model = build_model(2).eval()
    meta = save_export(tmp_path / "m", model, ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    graph = tmp_path / "m" / "model.ts"
    assert graph.is_file()
    x = np.random.default_rng(1).standard_normal((5, 1, CFG.image_size, CFG.image_size), dtype=np.float32)
    probs, imported = _score_in_fresh_process(tmp_path / "m", "torch", x, tmp_path)
    assert "torchvision" not in imported
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)

    other = build_model(2).eval()  # different random weights, traced under this export's name
    export_torchscript(other, CFG.image_size, graph, "another-model")
    from cxr.engine import load_engine

    np.testing.assert_allclose(load_engine(tmp_path / "m", "torch").predict_proba(x), expected, atol=1e-5)
    tag = {"model_id": ""}
    torch.jit.load(str(graph), _extra_files=tag)
    assert tag["model_id"].decode() == meta.model_id  # rebuilt from the weights, beside them


def test_onnx_engine_never_imports_torch(tmp_path: Path) -> None:
    """Decode workers, and screening actors and replicas on ONNX Runtime, skip torch's ~3 s import;
    `auto` still resolves."""
    from cxr.engine import preferred_batch, resolve_backend

    save_export(tmp_path / "m", build_model(2).eval(), ModelMetadata(classes=list(CLASSES["binary"]), preprocess=CFG))
    probs, imported = _score_in_fresh_process(tmp_path / "m", "onnx", np.zeros((2, 1, CFG.image_size, CFG.image_size),
                                                                              np.float32), tmp_path)
    assert probs.shape == (2, 2) and imported == set()
    assert resolve_backend("onnx") == "onnx" and resolve_backend("auto", gpu=True) == "torch"
    assert resolve_backend("auto", gpu=False) in ("torch-bf16", "onnx")
    assert preferred_batch("torch-bf16", gpu=False) == 16 and preferred_batch("onnx", gpu=False) == 32
    assert preferred_batch("auto", gpu=True) == 64


# ----------------------------------------------------------------- config and metrics


def test_config_round_trip_and_presets() -> None:
    assert resolve_train_config("tiny", {}).limit == 256 and not resolve_train_config("tiny", {"limit": 0}).limit
    cfg = resolve_train_config("cpu", {"epochs": 3, "image_size": 96, "lr": None})
    assert cfg.epochs == 3 and cfg.preprocess.image_size == 96 and cfg.lr == 2e-3
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(CxrError, match="unknown preset"):
        resolve_train_config("huge", {})


def test_warmup_only_with_pretrained_weights_and_one_gpu_per_worker(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cxr.cli import main

    assert resolve_train_config("gpu", {}).warmup_epochs == 2
    assert resolve_train_config("gpu", {"pretrained": "none"}).warmup_epochs == 0
    # asked for explicitly without pretrained weights: said, not silently dropped (then the data is missing)
    res = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "r"),
                                    "--preset", "tiny", "--epochs", "1", "--warmup-epochs", "2"])
    assert "warning: --warmup-epochs 2 ignored" in res.output and res.exit_code == 2, res.output
    with pytest.raises(CxrError, match="--epochs .2. must be more than --warmup-epochs .2."):
        resolve_train_config("gpu", {"epochs": 2})
    with pytest.raises(CxrError, match="--gpus is GPUs per worker: 0 or 1"):
        resolve_train_config("gpu", {"gpus": 2})


def test_resume_keeps_the_saved_config_and_lists_changed_flags() -> None:
    from cxr.config import resume_config

    saved = resolve_train_config("gpu", {"data": "d", "output": "runs/a"})
    # the README's short form: --data/--output/--resume over the default preset (cpu) continue the gpu run
    given = resolve_train_config("cpu", {"data": "/abs/d", "output": "runs/b", "resume": True, "early_stop_patience": 9})
    cfg = resume_config(saved, given, {"data", "output", "resume", "early_stop_patience"})
    assert (cfg.preset, cfg.workers, cfg.batch_size, cfg.preprocess.image_size) == ("gpu", 4, 64, 224)
    assert (cfg.data, cfg.output, cfg.resume, cfg.early_stop_patience) == ("/abs/d", "runs/b", True, 9)
    with pytest.raises(CxrError) as err:
        resume_config(saved, given, {"data", "output", "resume", "preset", "workers", "batch_size", "image_size"})
    msg = str(err.value)
    assert "\n" not in msg and "--preset cpu (the run has gpu)" in msg and "--workers 2 (the run has 4)" in msg
    assert "--batch-size 32 (the run has 64)" in msg and "--image-size 128 (the run has 224)" in msg
    assert resume_config(saved, cfg, None) == cfg  # passing the resolved config again changes nothing


def test_training_stats_cover_every_rank_and_unusable_data_fails_clearly() -> None:
    parts = [{"loss_sum": 8.0, "correct": 6, "train_images": 8, "images_per_s": 10.0},
             {"loss_sum": 4.0, "correct": 2, "train_images": 8, "images_per_s": 12.0}]
    merged = merge_epoch_stats(parts)
    assert merged["loss"] == 0.75 and merged["train_accuracy"] == 0.5 and merged["images_per_s"] == 22.0
    # (kept, skipped) per rank: every rank reads the whole training set, so its skips count once
    assert check_loaded([(10, 1), (10, 1)], [(2, 0), (0, 1)]) == 2
    with pytest.raises(CxrError, match="different numbers of training images .rank 0: 10, rank 1: 9."):
        check_loaded([(10, 1), (9, 2)], [(2, 0), (2, 0)])
    with pytest.raises(CxrError, match="no readable training images .4 unreadable."):
        check_loaded([(0, 4), (0, 4)], [(1, 0), (0, 0)])
    with pytest.raises(CxrError, match="no readable validation images"):
        check_loaded([(4, 0), (4, 0)], [(0, 1), (0, 0)])


def test_threshold_for_sensitivity_and_decision() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    score = np.clip(y * 0.3 + rng.normal(0.4, 0.2, 1000), 0, 1)
    for target in (0.9, 0.95, 0.98):
        thr = threshold_for_sensitivity(y, score, target)
        m = binary_metrics(y, score, thr)
        assert m["sensitivity"] >= target
        # the best such cut: moving it past the next positive above it would fall below the target
        higher = np.sort(score[y == 1])
        nxt = higher[higher > thr]
        after = higher[higher > nxt[0]]
        if after.size:
            assert binary_metrics(y, score, after[0])["sensitivity"] < target
        # and it sits midway in the gap between samples, not on a sample's score
        assert not np.isclose(score, thr, rtol=0, atol=1e-12).any()
        gap_lo, gap_hi = score[score < thr].max(), score[score > thr].min()
        assert thr == pytest.approx((gap_lo + gap_hi) / 2) and gap_hi == nxt[0]
    assert binary_metrics(y, score, threshold_for_sensitivity(y, score, 1.0))["sensitivity"] == 1.0
    for bad in (98, 1.5, 0.0):  # a percentage, a typo: once a silently wrong threshold or an IndexError
        with pytest.raises(ValueError, match="target sensitivity"):
            threshold_for_sensitivity(y, score, bad)
    probs = np.array([[0.9, 0.06, 0.04], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert decide(probs, CLASSES["subtype"], threshold=0.35) == ["normal", "virus", "bacteria"]


def test_augmentation_is_seeded_per_sample_so_loader_processes_and_restarts_repeat_it(sample_images) -> None:
    """Persistent DataLoader processes are seeded once: a run resumed at epoch 1 used to augment it with
    other draws than the run that went on. Seeded per (seed, epoch, rank, position), epoch 1 is the same
    through 2 persistent loader processes after epoch 0 as through a fresh loader started at epoch 1."""
    from cxr.config import AugmentConfig
    from cxr.preprocess import make_train_augment
    from cxr.training import EpochSeeded, XrayDataset, load_images

    images = load_images([str(p) for p in sample_images[:8]], [0, 1] * 4, CFG.max_pixels)
    ds = XrayDataset(images, CFG, make_train_augment(AugmentConfig()))

    def loader(workers: int) -> tuple[EpochSeeded, torch.utils.data.DataLoader]:
        shard = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True)
        sampler = EpochSeeded(shard, seed=3, rank=0)
        return sampler, torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True,
                                                    num_workers=workers, persistent_workers=workers > 0)

    def epoch(sampler: EpochSeeded, dl: torch.utils.data.DataLoader, e: int) -> torch.Tensor:
        sampler.set_epoch(e)
        return torch.cat([x for x, _ in dl])

    sampler, persistent = loader(2)
    first = epoch(sampler, persistent, 0)
    went_on = epoch(sampler, persistent, 1)
    sampler, fresh = loader(0)
    resumed = epoch(sampler, fresh, 1)
    assert torch.equal(went_on, resumed)
    assert not torch.equal(first, went_on)  # the augmentation (and the order) differ between epochs


def test_sigterm_raises_terminated_and_an_ignored_sighup_stays_ignored() -> None:
    """SIGTERM takes Ctrl-C's path (cxr.errors.Terminated); under nohup (SIGHUP ignored) a closed terminal
    must not stop a long screening run; a job run in-process gives the caller its own handlers back."""
    code = (
        "import os, signal\n"
        "from cxr.errors import Terminated, termination_as_interrupt\n"
        "def mine(signum, frame): print('caller handler', signum)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "with termination_as_interrupt():\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        signal.pause()\n"
        "    except Terminated as exc:\n"
        "        print('terminated', exc.signum)\n"
        "print(signal.getsignal(signal.SIGTERM) is mine, signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    term = int(signal.SIGTERM)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == [f"terminated {term}", "True True", f"caller handler {term}"], out.stdout


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32"])
@pytest.mark.parametrize("shape", [(1, 7), (5000, 1), (257, 131)])
def test_per_value_lookup_is_the_transform_itself(dtype: str, shape: tuple[int, int]) -> None:
    """A DICOM's grey stage runs once per stored value and is looked up (memory: BENCHMARKS.md, 'Decoding
    one large film'): bit-identical to running it on the image, signed data, tables past 2^16 included."""
    from pydicom.dataset import Dataset

    from cxr.preprocess import _dicom_gray, _per_value

    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    raw = rng.integers(max(info.min, -70_000), min(info.max, 70_000), shape, endpoint=True).astype(dtype)
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation = min(info.bits, 16), int(info.min < 0)
    ds.RescaleSlope, ds.RescaleIntercept = 0.7, -12
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 300, 900, "SIGMOID"
    ds.PhotometricInterpretation = "MONOCHROME1"

    def gray(values: np.ndarray) -> np.ndarray:
        return _dicom_gray(values, ds, "MONOCHROME1")

    expected = gray(raw)
    got = _per_value(raw, gray)
    assert got.dtype == np.float32 and got.shape == raw.shape
    np.testing.assert_array_equal(got, expected)
