"""One rank of a DeepSpeed tensor-parallel run; started by the ``deepspeed`` launcher, never by pytest directly.

    python -m deepspeed.launcher.runner --num_gpus 2 --master_port PORT tests/adapters/dist/ds_tp.py \
        --model DIR --out result.json --max-new-tokens 12 --prompt "hello" --prompt "..."

Every rank loads the model with ``DeepSpeedEngine(tensor_parallel_size=N)`` and runs the same greedy batch (tensor
parallelism is SPMD: all ranks take part in every forward pass); rank 0 writes the results and the engine status
as JSON. On CPU the launcher's ``LOCAL_SIZE`` (equal to the world size) is what keeps the shared-memory all-reduce
from segfaulting, and the launcher sets ``--num_gpus`` ranks on the CPU accelerator too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--local_rank", type=int, default=None)  # the launcher appends it; LOCAL_RANK has it too
    args = parser.parse_args(argv)

    from adapters.base import GenerationRequest, ModelSpec, SamplingParams
    from adapters.deepspeed_engine import DeepSpeedEngine

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    engine = DeepSpeedEngine({"tensor_parallel_size": world})
    engine.load(ModelSpec("tiny", args.model))
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=args.max_new_tokens)) for p in args.prompt]
    results = engine._generate_sync(requests)
    status = engine.status()
    engine.close()
    if rank == 0:
        payload = {
            "results": [[r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason] for r in results],
            "status": status,
        }
        Path(args.out).write_text(json.dumps(payload))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
