// The greedy draft walk of NUDGING.md section 5 on the host: the CPU engine's walk. The Triton kernel
// (kernels/handoff_walk.py) is the GPU's; both must equal nudge_engine/pairing/handoff_torch.py.
#pragma once

#include <cstdint>

namespace nudge {

constexpr int64_t kNoToken = -1;     // no draft at a position / no emitted token
constexpr int32_t kModeBase = 0;     // the base model writes
constexpr int32_t kModeNudge = 1;    // the nudger writes
constexpr int8_t kSrcBase = 0;       // an accepted token is the base's greedy token
constexpr int8_t kSrcNudger = 1;     // an accepted token is the nudger's
constexpr int8_t kNoSource = -1;     // a position whose draft was not accepted

// Inputs: per position p (num_pos of them) the base's argmax, its top-1 probability and the draft
// there (kNoToken at a request's last position); request r owns [pos_start[r], pos_start[r + 1])
// and starts in mode[r] with run[r] nudger tokens written. Outputs per request: drafts accepted,
// the emitted token (kNoToken: none), the mode and run after the walk; per position the source of
// an accepted draft (kNoSource elsewhere). Throws std::invalid_argument on out-of-range ids.
struct WalkInputs {
  const int64_t* argmax;
  const float* top1;
  const int64_t* drafts;
  const int32_t* pos_start;    // [num_req + 1]
  const int32_t* mode;
  const int32_t* run;
  const float* gamma;
  const uint8_t* resume_on_agreement;
  const uint8_t* word_start;   // [vocab]
  int64_t num_req;
  int64_t num_pos;
  int64_t vocab;
};

struct WalkOutputs {
  int32_t* num_accepted;  // [num_req]
  int64_t* emit_token;    // [num_req]
  int32_t* new_mode;      // [num_req]
  int32_t* new_run;       // [num_req]
  int8_t* source;         // [num_pos]
};

void handoff_walk(const WalkInputs& in, const WalkOutputs& out);

}  // namespace nudge
