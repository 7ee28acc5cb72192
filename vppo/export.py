"""The trained policy in Hugging Face format, next to the run's checkpoints (`run.export_hf`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vppo import lora
from vppo.data import save_prompt_suffix
from vppo.distributed import barrier, gathered
from vppo.tokens import eos_ids_of


def export_hf(engine, processor, out: Path, rank: int, suffix: str | None) -> None:
    """Write the engine's policy to `out` (gathering ZeRO-3 shards), atomically by rank 0, with the
    prompt suffix it was trained on (vppo.data.PROMPT_FILE, read by vppo.eval). Every rank calls it.
    With LoRA `out` holds the merged model (W + scale * B @ A under the base names: a plain model
    for from_pretrained, vppo.eval and vLLM) and out/adapter/ the adapter in PEFT's layout."""
    hf = engine.module.hf
    with gathered(list(hf.parameters())):
        if rank == 0:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # generate() of the export stops where training's rollouts stopped (the tokenizer's and
            # the chat template's EOS too, not only the base generation config's)
            hf.generation_config.eos_token_id = eos_ids_of(hf, processor.tokenizer)
            if lora.enabled(hf):
                state = lora.merged_state(hf)
                lora.save_adapter(hf, tmp / lora.ADAPTER_DIR, getattr(hf, "name_or_path", None))
            else:
                state = {k: v.detach().cpu().clone() for k, v in hf.state_dict().items()}
            hf.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
            save_prompt_suffix(tmp, suffix)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    barrier()
