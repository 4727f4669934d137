#include "handoff_walk.h"

#include <stdexcept>
#include <string>

namespace nudge {

namespace {

// One position of the walk (pairing/handoff_torch.py walk_step, for one request).
struct StepResult {
  bool accept_base, accept_nudger, emit;
  int32_t mode, run;
};

StepResult walk_step(int32_t mode, int32_t run, int64_t d, int64_t a, float t1, float gamma,
                     bool resume_on_agreement, bool word_start_d) {
  const bool has_draft = d != kNoToken;
  const bool in_base = mode == kModeBase;
  const bool nudge_now = t1 < gamma;  // strict: top1 == gamma stays with the base
  const bool agree = a == d;
  const bool resume = t1 >= gamma || (resume_on_agreement && agree);
  const bool hand_back = run > 0 && word_start_d && resume;

  StepResult r;
  r.accept_nudger = has_draft && ((in_base && nudge_now) || (!in_base && !hand_back));
  r.accept_base = has_draft && agree && ((in_base && !nudge_now) || (!in_base && hand_back));
  r.emit = (in_base && !nudge_now && (!has_draft || !agree)) ||
           (!in_base && has_draft && hand_back && !agree);
  const bool to_nudge = in_base && nudge_now;
  const bool to_base = !in_base && has_draft && hand_back;
  r.mode = to_nudge ? kModeNudge : to_base ? kModeBase : mode;
  r.run = to_nudge ? static_cast<int32_t>(has_draft) : to_base ? 0 : (!in_base && has_draft) ? run + 1 : run;
  return r;
}

}  // namespace

void handoff_walk(const WalkInputs& in, const WalkOutputs& out) {
  for (int64_t p = 0; p < in.num_pos; ++p) out.source[p] = kNoSource;
  for (int64_t r = 0; r < in.num_req; ++r) {
    const int64_t begin = in.pos_start[r], end = in.pos_start[r + 1];
    if (begin < 0 || end < begin || end > in.num_pos) {
      throw std::invalid_argument("handoff_walk: request " + std::to_string(r) + " owns positions [" +
                                  std::to_string(begin) + ", " + std::to_string(end) + ") outside [0, " +
                                  std::to_string(in.num_pos) + ")");
    }
    int32_t mode = in.mode[r], run = in.run[r], accepted = 0;
    int64_t emit = kNoToken;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t d = in.drafts[p];
      if (d != kNoToken && (d < 0 || d >= in.vocab)) {
        throw std::invalid_argument("handoff_walk: draft " + std::to_string(d) + " at position " +
                                    std::to_string(p) + " is outside the vocabulary of " +
                                    std::to_string(in.vocab));
      }
      const bool ws_d = d != kNoToken && in.word_start[d] != 0;
      const StepResult s = walk_step(mode, run, d, in.argmax[p], in.top1[p], in.gamma[r],
                                     in.resume_on_agreement[r] != 0, ws_d);
      mode = s.mode;
      run = s.run;
      if (s.emit) emit = in.argmax[p];
      if (!(s.accept_base || s.accept_nudger)) break;
      ++accepted;
      out.source[p] = s.accept_base ? kSrcBase : kSrcNudger;
    }
    out.num_accepted[r] = accepted;
    out.emit_token[r] = emit;
    out.new_mode[r] = mode;
    out.new_run[r] = run;
  }
}

}  // namespace nudge
