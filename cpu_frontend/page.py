"""The public page: the Gradio Blocks that people see, and the API endpoints they expose.

Only layout and wiring to the handlers of ``app.py`` live here. The model's
name and its default steps and guidance come from the GPU tiers' health
documents, read again on every page load (callable component values), so a
live model change or a GPU tier that started after the frontend shows the
right defaults without a restart.
"""

from collections.abc import Callable
from typing import Any

import gradio as gr

from shared.schema import Limits

FALLBACK_DEFAULTS = {"steps": 4, "guidance_scale": 0.0}
"""Slider defaults while no GPU tier has answered a health check."""
TINY_NOTE = (
    "**Note:** this deployment serves `{model}`, a placeholder model (`tiny` has random weights, "
    "`sleep:MS` only waits): its images are noise or flat. Set `SPLITSPACE_MODEL` "
    "(e.g. `stabilityai/sd-turbo`) for real images."
)


class LiveModel:
    """The model a GPU tier serves, as its latest health document says."""

    def __init__(self, health: Callable[[], dict[str, Any] | None]) -> None:
        self._health = health

    def doc(self) -> dict[str, Any]:
        return self._health() or {}

    def defaults(self) -> dict[str, Any]:
        return {**FALLBACK_DEFAULTS, **(self.doc().get("defaults") or {})}

    def heading(self) -> str:
        doc = self.doc()
        model = doc.get("model", "unknown (no GPU tier has answered yet)")
        text = f"# splitspace\nText to image on a shared GPU, scheduled fairly per client. Model: `{model}`."
        if doc.get("placeholder_model"):
            text += "\n\n" + TINY_NOTE.format(model=model)
        return text


def build_page(
    model: LiveModel, limits: Limits, generate: Callable[..., Any], quota: Callable[..., Any]
) -> gr.Blocks:
    with gr.Blocks(title="splitspace", delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(model.heading)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", max_length=limits.prompt_max_chars, lines=2)
                with gr.Accordion("Advanced settings", open=False):
                    negative = gr.Textbox("", label="Negative prompt", max_length=limits.negative_prompt_max_chars)
                    with gr.Row():
                        width = gr.Slider(limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Width")
                        height = gr.Slider(limits.min_side, limits.max_side, 512, step=limits.side_multiple, label="Height")
                    steps = gr.Slider(limits.min_steps, limits.max_steps, lambda: model.defaults()["steps"],
                                      step=1, label="Steps")
                    guidance = gr.Slider(limits.min_guidance, limits.max_guidance,
                                         lambda: model.defaults()["guidance_scale"], step=0.5, label="Guidance scale")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0)
                run = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Image", type="filepath", format="png", interactive=False)
                info_box = gr.JSON(label="Info")
                with gr.Accordion("Your quota", open=False):
                    quota_box = gr.JSON(label="Quota")
                    refresh = gr.Button("Refresh quota")
        inputs = [prompt, negative, width, height, steps, guidance, seed]
        # preprocess=False: our validation (one definition, errors that name the field) sees
        # the raw values first, instead of the components' own range checks.
        # postprocess=False: the handler returns final outputs (see app.image_output).
        run.click(generate, inputs, [image, info_box], api_name="generate", concurrency_limit=None,
                  preprocess=False, postprocess=False)
        prompt.submit(generate, inputs, [image, info_box], api_visibility="private", concurrency_limit=None,
                      preprocess=False, postprocess=False)
        refresh.click(quota, None, quota_box, api_name="quota", concurrency_limit=None)
    return blocks
