// deltatune's umbrella header: every public component, one line each, in the order of
// the architecture (DESIGN.md): kernels, methods, core, backbones, text, train.
// Leaves out the CUDA kernels (kernels/kron_sum_cuda.cuh): link deltatune::cuda for those.
#pragma once

#include <deltatune/core/error.hpp>          // Error, ShapeError, OptionError, CheckpointError: what deltatune throws
#include <deltatune/core/format.hpp>         // fmt, as LibTorch ships it, header-only
#include <deltatune/kernels/kron_sum.hpp>    // kron_sum, kron_sum_matmul: Kronecker sums with their own backward

#include <deltatune/core/delta.hpp>          // DeltaModule and its families: WeightDelta, ActivationDelta, InputDelta
#include <deltatune/core/precision.hpp>      // set_frozen_dtype: a bf16 backbone with float32 deltas (mixed precision)
#include <deltatune/core/site.hpp>           // Sites: FrozenLinear, OutputSite, AttentionSite, PromptSite; find_sites, SitePattern
#include <deltatune/core/recipe.hpp>         // DeltaRecipe, RecipeBase: how a method attaches; default sites per model_type
#include <deltatune/core/method_table.hpp>   // MethodTable, MethodInfo, MethodPreset: one row per method
#include <deltatune/methods/lora.hpp>        // LoRA: W0 + (alpha / r) B A, mergeable; each method's header holds its recipe and table row
#include <deltatune/methods/vera.hpp>        // VeRA: shared frozen random A, B; trained scaling vectors d, b
#include <deltatune/methods/lokr.hpp>        // LoKr: W0 + (alpha / r) W1 (x) W2, factors full or low-rank
#include <deltatune/methods/bitfit.hpp>      // BitFit: trained bias offsets, added biases where there are none
#include <deltatune/methods/ia3.hpp>         // IA3: learned scaling of keys, values, feed-forward activation
#include <deltatune/methods/phm.hpp>         // PHMLinear, PHMSharedFactors: W = sum_i A_i (x) B_i
#include <deltatune/methods/adapter.hpp>     // Adapter: Houlsby, Pfeiffer, PHM-Adapter, Compacter, Compacter++
#include <deltatune/methods/prompt.hpp>      // PromptTuning: P trained input embeddings
#include <deltatune/methods/prefix.hpp>      // PrefixTuning: trained keys and values prepended at attention sites
#include <deltatune/methods/spec.hpp>        // select_parameters: last layers, chosen names, layer norms

#include <deltatune/core/safetensors.hpp>    // read_safetensors, write_safetensors (atomic): Hugging Face's format
#include <deltatune/core/json_file.hpp>      // read_json_file: JSON files, errors naming the file
#include <deltatune/core/delta_model.hpp>    // DeltaModel: attach deltas by name pattern, train, merge, save and load
#include <deltatune/methods/method_table.hpp>  // builtin_methods(): deltatune's methods, one row each
#include <deltatune/formats/peft.hpp>        // save_peft, load_peft: adapters in Hugging Face peft's layout, both ways
#include <deltatune/formats/adapters.hpp>    // save_adapters, load_adapters: adapters' (AdapterHub) bottleneck layout

#include <deltatune/backbones/checkpoint.hpp>  // read_hf_directory, read_torchscript, load_parameters: backbone weights
#include <deltatune/backbones/bert.hpp>        // BertModel, BertForSequenceClassification, load_bert: native BERT
#include <deltatune/backbones/t5.hpp>          // T5Model, load_t5: native T5 (v1.0, v1.1 / Flan), sites under HF names
#include <deltatune/backbones/torchscript_model.hpp>  // TorchScriptModel: deltas on any traced or scripted model

#include <deltatune/text/sentencepiece_tokenizer.hpp>  // T5Tokenizer: SentencePiece with T5's conventions
#include <deltatune/text/wordpiece_tokenizer.hpp>      // WordPieceTokenizer: BERT's normaliser and WordPiece

#include <deltatune/train/glue.hpp>          // read_glue, GlueTask, to_t5 / from_t5_label: GLUE TSVs, T5's text to text
#include <deltatune/train/metrics.hpp>       // accuracy, f1_score, matthews_corrcoef, pearson, spearman
#include <deltatune/train/trainer.hpp>       // Trainer, TrainerOptions, LrSchedule, LossScaler, save/load_train_state, plot, log
