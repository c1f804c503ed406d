"""What an exported graph answers alone, in onnxruntime: the reference the served answers must equal."""

import numpy as np
import onnxruntime as ort


def graph_probabilities(path, frames: np.ndarray) -> np.ndarray:
    """Zero state, the whole sequence in one call, the softmax at its last frame."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"x": frames[None].astype(np.float32)}
    for spec in session.get_inputs()[1:]:
        if spec.name == "lengths":
            feeds["lengths"] = np.array([len(frames)], np.int64)
        else:
            feeds[spec.name] = np.zeros((spec.shape[0], 1, spec.shape[2]), np.float32)
    logits = session.run(None, feeds)[0][0, -1]
    z = np.exp(logits - logits.max())
    return z / z.sum()
