"""unCLIP generation with any prior: Kandinsky v2.2 and Karlo pipelines and the `generate` runner."""

from __future__ import annotations

from typing import TYPE_CHECKING

# diffusers pipelines import slowly; load them on first use.
_LAZY = {
    "EclipseKandinskyV22Pipeline": "eclipse_prior.pipelines.kandinsky",
    "EclipseKarloPipeline": "eclipse_prior.pipelines.karlo",
    "EclipsePipelineOutput": "eclipse_prior.pipelines.common",
    "IncompatibleModelsError": "eclipse_prior.pipelines.common",
    "load_pipeline": "eclipse_prior.pipelines.generate",
    "generate_images": "eclipse_prior.pipelines.generate",
    "run_generation": "eclipse_prior.pipelines.generate",
    "regenerate": "eclipse_prior.pipelines.generate",
}

if TYPE_CHECKING:
    from eclipse_prior.pipelines.common import EclipsePipelineOutput, IncompatibleModelsError  # noqa: F401
    from eclipse_prior.pipelines.generate import (  # noqa: F401
        generate_images,
        load_pipeline,
        regenerate,
        run_generation,
    )
    from eclipse_prior.pipelines.kandinsky import EclipseKandinskyV22Pipeline  # noqa: F401
    from eclipse_prior.pipelines.karlo import EclipseKarloPipeline  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eclipse_prior.pipelines' has no attribute {name!r}")


__all__ = list(_LAZY)
