"""The model the user brings (model.factory), checked on the driver before Ray starts: it must
import here (workers import it the same way), and a resume must continue the same model."""

from __future__ import annotations

from configs import Config
from configs.schema import ModelSection
from ray_job.errors import UserError


def check_importable(cfg: Config) -> None:
    """Import model.factory now: a typo or a module the job does not ship fails in seconds."""
    if cfg.model.factory == ModelSection().factory:
        return  # the built-in GPT: importing torch here would only slow every refusal down
    from trainers.model import load_factory

    try:
        load_factory(cfg.model.factory)
    except Exception as e:  # ImportError, AttributeError, or anything the module raises
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"model.factory {cfg.model.factory}: cannot import it ({type(e).__name__}: {first}); "
            "ship its module in the job's working dir (ray job submit --working-dir) or install it"
        ) from None


def check_same_model(saved_config: dict, cfg: Config, checkpoint: str, forking: bool) -> str | None:
    """Refuse a resume into the same run with another factory or other factory arguments; a
    fork (a new --run-name) may change them on purpose: then returns a warning to print."""
    saved = saved_config.get("model", {}) if isinstance(saved_config, dict) else {}
    defaults = ModelSection()  # checkpoints from before model.factory existed used the built-in GPT
    then = (saved.get("factory", defaults.factory), saved.get("kwargs", defaults.kwargs))
    now = (cfg.model.factory, cfg.model.kwargs)
    if then == now:
        return None
    what = (f"model.factory {then[0]} with model.kwargs {then[1]} -> {now[0]} with {now[1]}")
    if not forking:
        raise UserError(
            f"--resume {checkpoint}: the checkpoint was trained with another model ({what}); resume "
            "with the same model.factory and model.kwargs, or fork into a new run with --run-name NEW"
        )
    return f"⚠️  {checkpoint}: forking with another model ({what}): its weights must still load"
