#include "batch_builder.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace nudge {

namespace {

// query_start_loc and seq_lens are int32 (what varlen attention kernels take).
constexpr int64_t kMaxInt32 = std::numeric_limits<int32_t>::max();

std::string at_seq(size_t i) { return "build_batch: sequence " + std::to_string(i) + ": "; }

}  // namespace

BatchShape measure_batch(const SequenceList& seqs, const std::vector<int64_t>& num_new,
                         int64_t block_size) {
  if (seqs.size() != num_new.size()) {
    throw std::invalid_argument("build_batch: " + std::to_string(seqs.size()) + " sequences but " +
                                std::to_string(num_new.size()) + " num_new values");
  }
  if (block_size <= 0) {
    throw std::invalid_argument("build_batch: block_size must be >= 1, got " +
                                std::to_string(block_size));
  }
  BatchShape shape;
  shape.num_seqs = static_cast<int64_t>(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence* seq = seqs[i].get();
    if (!seq) throw std::invalid_argument(at_seq(i) + "None");
    const int64_t n = num_new[i];
    if (seq->block_size() != block_size) {
      throw std::invalid_argument(at_seq(i) + "its pool has block_size " +
                                  std::to_string(seq->block_size()) + ", not " +
                                  std::to_string(block_size));
    }
    if (n < 0) {
      throw std::invalid_argument(at_seq(i) + "num_new must be >= 0, got " + std::to_string(n));
    }
    const int64_t end = seq->num_computed() + n;
    if (end > seq->num_tokens()) {
      throw std::invalid_argument(at_seq(i) + "num_computed + num_new = " + std::to_string(end) +
                                  " exceeds num_tokens = " + std::to_string(seq->num_tokens()));
    }
    if (end > seq->num_reserved_slots()) {
      throw std::invalid_argument(at_seq(i) + "tokens up to " + std::to_string(end) +
                                  " need slots but only " +
                                  std::to_string(seq->num_reserved_slots()) + " are reserved");
    }
    if (end > kMaxInt32) throw std::invalid_argument(at_seq(i) + "sequence too long for int32");
    shape.num_tokens += n;
    shape.max_query_len = std::max(shape.max_query_len, n);
    shape.max_seq_len = std::max(shape.max_seq_len, end);
    shape.max_blocks =
        std::max(shape.max_blocks, static_cast<int64_t>(seq->block_table().size()));
  }
  if (shape.num_tokens > kMaxInt32) {
    throw std::invalid_argument("build_batch: too many tokens for int32 offsets");
  }
  return shape;
}

void fill_batch(const SequenceList& seqs, const std::vector<int64_t>& num_new,
                int64_t block_size, const BatchShape& shape, const BatchBuffers& out) {
  int64_t t = 0;  // flat token index
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = *seqs[i];
    const int64_t start = seq.num_computed();
    const int64_t n = num_new[i];
    const int64_t* tokens = seq.tokens().data() + start;
    const std::vector<int32_t>& table = seq.block_table();

    out.query_start_loc[i] = static_cast<int32_t>(t);
    // Walk block and offset along instead of dividing per token.
    size_t block_idx = static_cast<size_t>(start / block_size);
    int64_t offset = start % block_size;
    for (int64_t j = 0; j < n; ++j, ++t) {
      out.input_ids[t] = tokens[j];
      out.positions[t] = start + j;
      out.slot_mapping[t] = static_cast<int64_t>(table[block_idx]) * block_size + offset;
      if (++offset == block_size) {
        offset = 0;
        ++block_idx;
      }
    }
    out.seq_lens[i] = static_cast<int32_t>(start + n);
    out.logits_indices[i] = n > 0 ? t - 1 : kNoLogits;

    int32_t* row = out.block_tables + static_cast<int64_t>(i) * shape.max_blocks;
    std::copy(table.begin(), table.end(), row);
    std::fill(row + table.size(), row + shape.max_blocks, kNoBlock);
  }
  out.query_start_loc[seqs.size()] = static_cast<int32_t>(t);
}

}  // namespace nudge
