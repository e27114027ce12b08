#include "rpc/windows.h"

#include <algorithm>
#include <limits>

namespace sae {

std::vector<Window> SplitIntoWindows(const std::vector<int32_t>& ids, int max_seq_len, std::optional<int32_t> bos) {
  const int n = static_cast<int>(ids.size());
  if (max_seq_len <= 0 || n <= max_seq_len) return {Window{0, n, false}};
  // With max_seq_len 1 a prepended BOS would leave no room for the text.
  const bool prepend = bos.has_value() && ids[0] == *bos && max_seq_len >= 2;
  std::vector<Window> windows;
  windows.push_back({0, max_seq_len, false});
  const int step = prepend ? max_seq_len - 1 : max_seq_len;
  for (int begin = max_seq_len; begin < n; begin += step)
    windows.push_back({begin, std::min(n, begin + step), prepend});
  return windows;
}

SequenceRequest WindowRequest(const SequenceRequest& request, const Window& window, std::optional<int32_t> bos) {
  // Every per-request option carries over; only the tokens differ.
  SequenceRequest out = request;
  out.ids.clear();
  if (window.bos_prepended) out.ids.push_back(*bos);
  out.ids.insert(out.ids.end(), request.ids.begin() + window.begin, request.ids.begin() + window.end);
  return out;
}

void DropPrependedRow(const Window& window, SequenceResult* result) {
  if (!window.bos_prepended) return;
  for (SaeTopK& top : result->saes) {
    const size_t k = static_cast<size_t>(std::max(top.k, 0));
    top.indices.erase(top.indices.begin(), top.indices.begin() + std::min(k, top.indices.size()));
    top.values.erase(top.values.begin(), top.values.begin() + std::min(k, top.values.size()));
    if (!top.reconstruction_error.empty()) top.reconstruction_error.erase(top.reconstruction_error.begin());
  }
  const size_t rows = static_cast<size_t>(window.n_tokens());
  for (auto& [name, values] : result->hooks) {
    const size_t d = values.size() / rows;  // [rows, d_model]
    values.erase(values.begin(), values.begin() + d);
  }
}

SequenceResult EmptyResult(const SequenceRequest& request) {
  SequenceResult full;
  full.saes.resize(request.sae_indices.size());
  const size_t slots = request.ids.size() * static_cast<size_t>(std::max(request.k, 0));
  for (SaeTopK& top : full.saes) {
    top.k = request.k;
    top.indices.assign(slots, -1);
    top.values.assign(slots, 0.0f);
    if (request.reconstruction_error) {
      top.reconstruction_error.assign(request.ids.size(), std::numeric_limits<float>::quiet_NaN());
    }
  }
  return full;
}

void PlaceWindow(const Window& window, const SequenceResult& window_result, int n_tokens, SequenceResult* full) {
  const size_t begin = static_cast<size_t>(window.begin);
  const size_t rows = static_cast<size_t>(window.end - window.begin);
  for (size_t j = 0; j < window_result.saes.size() && j < full->saes.size(); ++j) {
    const SaeTopK& from = window_result.saes[j];
    SaeTopK& to = full->saes[j];
    if (from.k != to.k || from.indices.size() != rows * to.k) continue;  // the engine fills every listed SAE
    std::copy(from.indices.begin(), from.indices.end(), to.indices.begin() + begin * to.k);
    std::copy(from.values.begin(), from.values.end(), to.values.begin() + begin * to.k);
    if (from.reconstruction_error.size() == rows && to.reconstruction_error.size() >= begin + rows) {
      std::copy(from.reconstruction_error.begin(), from.reconstruction_error.end(),
                to.reconstruction_error.begin() + begin);
    }
  }
  for (const auto& [name, values] : window_result.hooks) {
    if (rows == 0 || values.size() % rows != 0) continue;
    const size_t d = values.size() / rows;  // [rows, d_model]
    std::vector<float>& to = full->hooks[name];
    if (to.empty()) to.assign(static_cast<size_t>(n_tokens) * d, 0.0f);
    if (to.size() < (begin + rows) * d) continue;
    std::copy(values.begin(), values.end(), to.begin() + begin * d);
  }
}

}  // namespace sae
