"""The quality scorers' model files, all inside wheels the core install brings: PP-OCR, NudeNet, BRISQUE."""

from facecap.pipeline.models import ModelSpec, register_models

register_models(
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
