"""Container health: every model ready AND one real zero_shot inference (a dead Python stub keeps its model 'ready')."""

import json
import os
import struct
import sys
import urllib.request

from clip_common.contract import ZeroShot  # installed in the server image next to clip_runtime

URL = os.environ.get("CLIP_HEALTH_URL", "http://127.0.0.1:8000")
REPOSITORY = os.environ.get("CLIP_REPOSITORY", "/models")


def npy_pixel() -> bytes:
    """A 1x1 RGB uint8 image in .npy format (accepted by preprocess_image), built without numpy."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1, 1, 3), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\x80\x80\x80"


def bytes_element(data: bytes) -> bytes:
    """One BYTES tensor element in Triton's binary encoding: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + data


def main() -> int:
    """Exit 0 when healthy."""
    for model in sorted(os.listdir(REPOSITORY)):
        if os.path.isfile(os.path.join(REPOSITORY, model, "config.pbtxt")):
            urllib.request.urlopen(f"{URL}/v2/models/{model}/ready", timeout=5)
    text, image = bytes_element(b"a photo"), bytes_element(npy_pixel())
    header = json.dumps({
        "inputs": [
            {"name": ZeroShot.TEXT, "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(text)}},
            {"name": ZeroShot.IMAGE, "shape": [1, 1], "datatype": "BYTES",
             "parameters": {"binary_data_size": len(image)}},
        ],
        "outputs": [{"name": ZeroShot.PROBS, "parameters": {"binary_data": False}}],
    }).encode()
    request = urllib.request.Request(f"{URL}/v2/models/{ZeroShot.NAME}/infer", data=header + text + image,
                                     headers={"Inference-Header-Content-Length": str(len(header))})
    answer = json.loads(urllib.request.urlopen(request, timeout=20).read())
    probs = answer["outputs"][0]["data"]
    return 0 if len(probs) == 1 and abs(probs[0] - 1.0) < 1e-4 else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"; say why in `docker inspect`
        print(f"unhealthy: {exc}", file=sys.stderr)
        sys.exit(1)
