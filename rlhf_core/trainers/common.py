"""What every stage trainer shares (re-exported here from one module per concern: `config`, `setup`,
`data_order`, `state`, `session`, `loop`): config fields, accelerate setup, data order, checkpoint/resume, the
non-finite guard, throughput/memory meters, LoRA, the frozen reference, the atomic final save, and the
supervised loop used by SFT, the reward model and DPO.

Layout of a stage's `output_dir`:

    output_dir/checkpoints/step-N/   everything for an exact resume (weights, optimizer, scheduler,
                                     GradScaler, per-process RNG of python/numpy/torch; `trainer_state.json`:
                                     step, data position, stage extras), in safetensors + JSON, never pickle,
                                     with a `manifest.json` of sizes and hashes written last (`checkpoint.py`)
    output_dir/model/                the final model, Hugging Face layout (safetensors) + tokenizer

Both are written into a hidden temporary directory, fsync'd and renamed into place (`rlhf_core.atomic`), so a
directory with the final name is complete; a checkpoint is also checked against its manifest before a resume
uses it, falling back to the newest one that matches.

Batch sizes: `batch_size` is the micro-batch of ONE process for ONE forward pass. One optimizer step consumes
`global_batch = batch_size × grad_accum_steps × num_processes` rows, and every loss is normalised by the
count of its units (tokens for SFT, pairs for RM/DPO) over that whole global batch. So 1 process × 8
accumulation steps × batch 1, 1 × 1 × 8 and 2 × 1 × 4 compute the same update (up to float rounding).

Data order: a deterministic, epoch-seeded permutation stream (`EpochPermutationSampler`); the data position
is `(epoch, index)` in that stream, saved in every checkpoint.
"""

from __future__ import annotations

from rlhf_core.trainers.config import (  # noqa: F401
    LoRAConfig,
    LRSchedule,
    MixedPrecision,
    TrainerConfig,
    TrainResult,
    check_length_limits,
)
from rlhf_core.trainers.data_order import DataPosition, EpochPermutationSampler, shard_global_batch  # noqa: F401
from rlhf_core.trainers.loop import Stage, all_keys, evaluate, fit  # noqa: F401
from rlhf_core.trainers.session import (  # noqa: F401
    NonFiniteLossError,
    PlainProgress,
    Session,
    ThroughputMeter,
    all_reduce_sum,
    backward_normalized,
    ensure_finite,
    ensure_finite_weights,
    maybe_checkpoint,
    optimizer_step,
    peak_memory_mb,
    progress_bar,
    start_session,
)
from rlhf_core.trainers.setup import (  # noqa: F401
    apply_lora,
    build_optimizer,
    build_scheduler,
    freeze,
    is_peft_model,
    lr_factor,
    make_accelerator,
    reference_model,
    set_seed,
    supported_mixed_precision,
)
from rlhf_core.trainers.state import (  # noqa: F401
    CHECKPOINTS_DIRNAME,
    MODEL_DIRNAME,
    STATE_FILENAME,
    TrainState,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_final_model,
)
