// tessera's C++ trainer API in one include (target Tessera::torch): the job's ranks (World), sharding a libtorch
// model (ShardedModel, Shard, ShardRoot), the optimizer and clipping (optim::AdamW, ClipGradNorm), checkpoints in
// the Python path's format (checkpoint::Checkpointer) and Hugging Face Llama weights (hf::). See
// examples/cpp/llama_trainer for a complete trainer and README.md ("C++ trainers").
#pragma once

#include "tessera/api/adamw.h"
#include "tessera/api/checkpointer.h"
#include "tessera/api/hf_safetensors.h"
#include "tessera/api/sharded.h"
#include "tessera/api/status_error.h"
#include "tessera/api/world.h"
#include "tessera/torch/tensor_view.h"
