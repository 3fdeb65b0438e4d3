"""Image to image on the GPU tier: a picture in, its mirror image out (PIL, no model).

    splitspace dev examples/mirror.py

As with ``@spaces.GPU``, ``python examples/mirror.py`` still runs it in one process, as
plain Gradio would. Pictures cross between the tiers as their bytes; the frontend checks
each one first (an image, under ``SPLITSPACE_MAX_FILE_BYTES``).
"""

import gradio as gr
from PIL import Image, ImageOps

import splitspace


@splitspace.gpu(duration=5)
def mirror(picture: Image.Image, upside_down: bool) -> Image.Image:
    return ImageOps.flip(picture) if upside_down else ImageOps.mirror(picture)


demo = gr.Interface(
    mirror,
    [gr.Image(type="pil", label="Picture"), gr.Checkbox(label="Upside down")],
    gr.Image(type="pil", label="Mirrored"),
    api_name="mirror",
)

if __name__ == "__main__":
    demo.launch()
