"""Text to image with diffusers on the GPU tier, written as a ZeroGPU Space is.

    splitspace dev examples/text_to_image.py                  # stabilityai/sd-turbo from the Hub
    MODEL_ID=tiny splitspace dev examples/text_to_image.py    # no download: random weights (noise)

``MODEL_ID`` names any diffusers text-to-image model; ``tiny`` is splitspace's own
small pipeline with random weights, for machines that cannot download one.

The weights load on the GPU tier only, at the first call (:func:`pipe`): the frontend
imports this file too, to serve its page, and must not load torch or a model. So torch
and diffusers are imported inside the functions that run on the GPU tier, never at the
top of the file.
"""

import os

import gradio as gr

import splitspace

MODEL_ID = os.environ.get("MODEL_ID", "stabilityai/sd-turbo")

_pipe = None


def pipe():
    """The pipeline, loaded at first use (on the GPU tier), then kept."""
    global _pipe
    if _pipe is None:
        import torch

        cuda = torch.cuda.is_available()
        if MODEL_ID == "tiny":
            from splitspace.gpu_backend.workload.tiny import build_tiny_pipeline

            loaded = build_tiny_pipeline()
        else:
            from diffusers import AutoPipelineForText2Image

            loaded = AutoPipelineForText2Image.from_pretrained(
                MODEL_ID, torch_dtype=torch.float16 if cuda else torch.float32
            )
        _pipe = loaded.to("cuda" if cuda else "cpu")
    return _pipe


@splitspace.gpu(duration=lambda prompt, steps, size, seed: 2 + steps * (size / 512) ** 2)
def generate(prompt: str, steps: int, size: int, seed: int):
    import torch

    model = pipe()
    generator = torch.Generator(device=model.device).manual_seed(int(seed))
    return model(
        prompt,
        num_inference_steps=int(steps),
        guidance_scale=0.0,
        width=int(size),
        height=int(size),
        generator=generator,
    ).images[0]


demo = gr.Interface(
    generate,
    [
        gr.Textbox(label="Prompt", max_length=500),
        gr.Slider(1, 4, step=1, value=1, label="Steps"),
        gr.Slider(256, 768, step=64, value=512, label="Size"),
        gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed"),
    ],
    gr.Image(label="Image"),
    api_name="generate",
)

if __name__ == "__main__":
    demo.launch()
