"""The attribute schema: the 40 CelebA attributes and the rest, with their Arrow types."""

from __future__ import annotations

import pyarrow as pa

# CelebA's attribute list, in the order of list_attr_celeba.txt (FaceCaption-15M's classifier map).
CELEBA40 = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip
EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
POSE_BINS = ("frontal", "left_three_quarter", "right_three_quarter", "left_profile", "right_profile")

OTHER: dict[str, pa.DataType] = {
    "age": pa.float32(),
    "age_std": pa.float32(),
    "gender": pa.string(),
    "gender_score": pa.float32(),
    "emotion": pa.string(),
    "emotion_score": pa.float32(),
    "yaw": pa.float32(),
    "pitch": pa.float32(),
    "roll": pa.float32(),
    "pose_bin": pa.string(),
    "eyes_open": pa.float32(),
    "mouth_open": pa.float32(),
    "smile": pa.float32(),
    "eyeglasses": pa.float32(),
    "sunglasses": pa.float32(),
    "face_mask": pa.float32(),
    "skin_ita": pa.float32(),
    "skin_monk": pa.int8(),
    "hair_color": pa.string(),
    # Set by the vlm backend (stages/tag/vlm.py lists their values).
    "hair_length": pa.string(),
    "headwear": pa.string(),
    "facial_hair": pa.string(),
    "makeup": pa.string(),
}
COLUMNS: dict[str, pa.DataType] = {
    **{f"attr_{name}": pa.float32() for name in CELEBA40},
    **OTHER,
    "attr_backends": pa.string(),
    "attr_models": pa.string(),  # per backend that judged the face: engine, model, revision, prompt hash, seed
    "confident_attributes": pa.list_(pa.string()),
}


def attribute_column(name: str) -> str:
    """The column of an attribute: CelebA names get the attr_ prefix, the others are as they are."""
    return f"attr_{name}" if name in CELEBA40 else name
