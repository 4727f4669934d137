// Flattens one model pass over several sequences into the arrays the attention kernels read.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "sequence.h"

namespace nudge {

// logits_indices entry of a sequence with no new token in this pass: it has no logits row.
// (Such a sequence still takes part, with an empty query: a model whose pending tokens are
// all computed while another model of the request catches up in a chunk.)
constexpr int64_t kNoLogits = -1;

// Sizes of the batch arrays, measured (and the request validated) before anything is written.
struct BatchShape {
  int64_t num_seqs = 0;
  int64_t num_tokens = 0;
  int64_t max_blocks = 1;  // block_tables width; at least 1 so the array is never 0-wide
  int64_t max_query_len = 0;
  int64_t max_seq_len = 0;
};

// Where fill_batch() writes; each points at room for the sizes in BatchShape.
struct BatchBuffers {
  int64_t* input_ids;        // [num_tokens]
  int64_t* positions;        // [num_tokens]
  int64_t* slot_mapping;     // [num_tokens]
  int32_t* query_start_loc;  // [num_seqs + 1]
  int32_t* seq_lens;         // [num_seqs]
  int32_t* block_tables;     // [num_seqs, max_blocks], kNoBlock padded
  int64_t* logits_indices;   // [num_seqs], kNoLogits where num_new is 0
};

using SequenceList = std::vector<std::shared_ptr<Sequence>>;

// Sequence i contributes tokens[num_computed : num_computed + num_new[i]]. Throws
// std::invalid_argument when num_new[i] < 0, when those tokens or their slots do not exist,
// or when block_size is not the block size of every sequence's pool.
BatchShape measure_batch(const SequenceList& seqs, const std::vector<int64_t>& num_new,
                         int64_t block_size);

// Writes the arrays. `shape` must come from measure_batch() on the same arguments.
void fill_batch(const SequenceList& seqs, const std::vector<int64_t>& num_new,
                int64_t block_size, const BatchShape& shape, const BatchBuffers& out);

}  // namespace nudge
