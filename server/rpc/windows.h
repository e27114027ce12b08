// Long requests as windows: a request longer than the model's context
// (max_seq_len) runs as several independent sequences, and their results are
// stitched back into one result over the request's positions.
//
// How a window starts: when the request itself starts with BOS, every window
// after the first gets a BOS prepended, so each window is the kind of context
// the SAEs were trained on (a document start, then text). The prepended BOS
// is never reported (it is not a position of the request). Positions restart
// at 0 in every window: tokens attend only within their window. A window is
// therefore exactly a request of its own, which tests check.
#ifndef SAE_RPC_WINDOWS_H_
#define SAE_RPC_WINDOWS_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "core/engine.h"

namespace sae {

struct Window {
  int begin = 0;               // first request position covered
  int end = 0;                 // one past the last
  bool bos_prepended = false;  // the sequence run is [BOS] + ids[begin, end)

  // Tokens the engine runs for this window.
  int n_tokens() const { return end - begin + (bos_prepended ? 1 : 0); }
};

// Windows of at most `max_seq_len` tokens each (prepended BOS included)
// covering `ids` in order. max_seq_len <= 0, or ids no longer than it: one
// window. BOS is prepended only when ids[0] == *bos and max_seq_len >= 2.
std::vector<Window> SplitIntoWindows(const std::vector<int32_t>& ids, int max_seq_len, std::optional<int32_t> bos);

// The sequence the engine runs for `window` of `request`.
SequenceRequest WindowRequest(const SequenceRequest& request, const Window& window, std::optional<int32_t> bos);

// Removes the prepended BOS row from the engine's result of `window`, so its
// rows are the request positions [begin, end).
void DropPrependedRow(const Window& window, SequenceResult* result);

// A result for all of `request`'s positions with no feature set yet
// (indices -1): windows are placed into it with PlaceWindow.
SequenceResult EmptyResult(const SequenceRequest& request);

// Copies `window_result` (after DropPrependedRow: rows for the positions
// [window.begin, window.end)) into `full`, made by EmptyResult for a request
// of `n_tokens` tokens.
void PlaceWindow(const Window& window, const SequenceResult& window_result, int n_tokens, SequenceResult* full);

}  // namespace sae

#endif  // SAE_RPC_WINDOWS_H_
