// The CIFG-LSTM's walk over time for training, forward and backward, in one C++ call each.
//
// Same mathematics as `CIFGRecurrence` in model.py (read that first). From Python, every
// step of the walk costs a dozen operator calls of a few microseconds each, on tensors of
// only batch x hidden elements: on a phone-sized batch that dispatch took as long as the
// step's matrix products. Here the products are still ATen's (the machine's BLAS), the
// sigmoid and tanh are ATen's vectorised kernels, and the rest of a step is a plain loop.
//
// The forward pass also writes each step's local derivatives (everything the backward
// pass needs that does not depend on the incoming gradient) while the step's values are
// in cache, so the backward walk is two matrix products and one loop per step.

#include <torch/extension.h>

#include <vector>

namespace {

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

}  // namespace

// gate_inputs (batch, steps, 3*hidden), h (batch, projection), c (batch, hidden),
// recurrent_weight (3*hidden, projection), projection_weight (projection, hidden).
// Returns outputs (batch, steps, projection), h_all (steps+1, batch, projection),
// c_all (steps+1, batch, hidden), m (steps, batch, hidden), and the local derivatives
// (steps, batch, hidden) each: c_from_m, input_from_c, candidate_from_c, output_from_m, forget.
std::vector<at::Tensor> cifg_forward(const at::Tensor& gate_inputs, const at::Tensor& h, const at::Tensor& c,
                                     const at::Tensor& recurrent_weight, const at::Tensor& projection_weight) {
  for (const auto& [t, name] : {std::pair{gate_inputs, "gate_inputs"}, {h, "h"}, {c, "c"},
                                {recurrent_weight, "recurrent_weight"}, {projection_weight, "projection_weight"}}) {
    check_input(t, name);
  }
  const int64_t batch = gate_inputs.size(0), steps = gate_inputs.size(1);
  const int64_t hidden = projection_weight.size(1), projection = projection_weight.size(0);
  TORCH_CHECK(gate_inputs.size(2) == 3 * hidden, "gate_inputs must have 3 * hidden features");

  auto options = gate_inputs.options();
  auto h_all = at::empty({steps + 1, batch, projection}, options);
  auto c_all = at::empty({steps + 1, batch, hidden}, options);
  auto m = at::empty({steps, batch, hidden}, options);
  std::vector<at::Tensor> local;  // c_from_m, input_from_c, candidate_from_c, output_from_m, forget
  for (int k = 0; k < 5; ++k) local.push_back(at::empty({steps, batch, hidden}, options));
  auto pre = at::empty({batch, 3 * hidden}, options);
  auto act = at::empty({batch, 3 * hidden}, options);
  auto tanh_c = at::empty({batch, hidden}, options);
  auto input_and_output_gates = act.narrow(1, 0, 2 * hidden), candidate = act.narrow(1, 2 * hidden, hidden);
  h_all[0].copy_(h);
  c_all[0].copy_(c);
  const auto recurrent_t = recurrent_weight.t();
  const auto projection_t = projection_weight.t();

  for (int64_t t = 0; t < steps; ++t) {
    at::addmm_out(pre, gate_inputs.select(1, t), h_all[t], recurrent_t);
    at::sigmoid_out(input_and_output_gates, pre.narrow(1, 0, 2 * hidden));
    at::tanh_out(candidate, pre.narrow(1, 2 * hidden, hidden));
    const float* a = act.data_ptr<float>();
    const float* c_prev = c_all[t].data_ptr<float>();
    float* c_next = c_all[t + 1].data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      const float* i = a + b * 3 * hidden;
      const float* g = i + 2 * hidden;
      const float* cp = c_prev + b * hidden;
      float* cn = c_next + b * hidden;
      for (int64_t j = 0; j < hidden; ++j) cn[j] = cp[j] + i[j] * (g[j] - cp[j]);  // (1 - i) c + i g
    }
    at::tanh_out(tanh_c, c_all[t + 1]);
    const float* tc = tanh_c.data_ptr<float>();
    float* mt = m[t].data_ptr<float>();
    float* c_from_m = local[0][t].data_ptr<float>();
    float* input_from_c = local[1][t].data_ptr<float>();
    float* candidate_from_c = local[2][t].data_ptr<float>();
    float* output_from_m = local[3][t].data_ptr<float>();
    float* forget = local[4][t].data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      const float* i = a + b * 3 * hidden;
      const float* o = i + hidden;
      const float* g = i + 2 * hidden;
      const float* cp = c_prev + b * hidden;
      const int64_t row = b * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const float tcj = tc[row + j];
        mt[row + j] = o[j] * tcj;
        c_from_m[row + j] = o[j] * (1.0f - tcj * tcj);
        input_from_c[row + j] = (g[j] - cp[j]) * i[j] * (1.0f - i[j]);
        candidate_from_c[row + j] = i[j] * (1.0f - g[j] * g[j]);
        output_from_m[row + j] = tcj * o[j] * (1.0f - o[j]);
        forget[row + j] = 1.0f - i[j];
      }
    }
    auto h_next = h_all[t + 1];
    at::mm_out(h_next, m[t], projection_t);
  }
  auto outputs = h_all.narrow(0, 1, steps).transpose(0, 1).contiguous();
  std::vector<at::Tensor> result{outputs, h_all, c_all, m};
  result.insert(result.end(), local.begin(), local.end());
  return result;
}

// Gradients of the walk. d_outputs (batch, steps, projection); d_h_last and d_c_last may be
// undefined (no gradient on the final state). Returns d_gate_inputs (batch, steps, 3*hidden),
// d_h, d_c, d_recurrent_weight, d_projection_weight.
std::vector<at::Tensor> cifg_backward(const at::Tensor& d_outputs_batch_major, const c10::optional<at::Tensor>& d_h_last,
                                      const c10::optional<at::Tensor>& d_c_last, const at::Tensor& recurrent_weight,
                                      const at::Tensor& projection_weight, const at::Tensor& h_all, const at::Tensor& m,
                                      const std::vector<at::Tensor>& local) {
  const int64_t steps = m.size(0), batch = m.size(1), hidden = m.size(2);
  auto d_outputs = d_outputs_batch_major.transpose(0, 1);
  auto d_h_all = at::empty_like(d_outputs, at::MemoryFormat::Contiguous);
  auto d_pre = at::empty({steps, batch, 3 * hidden}, m.options());
  auto d_m = at::empty({batch, hidden}, m.options());
  auto d_c = d_c_last.has_value() ? d_c_last->clone().contiguous() : at::zeros({batch, hidden}, m.options());
  d_h_all[steps - 1].copy_(d_outputs[steps - 1]);
  if (d_h_last.has_value()) d_h_all[steps - 1].add_(*d_h_last);
  float* dc = d_c.data_ptr<float>();
  const float* dm = d_m.data_ptr<float>();
  for (int64_t t = steps - 1; t >= 0; --t) {
    at::mm_out(d_m, d_h_all[t], projection_weight);
    const float* c_from_m = local[0][t].data_ptr<float>();
    const float* input_from_c = local[1][t].data_ptr<float>();
    const float* candidate_from_c = local[2][t].data_ptr<float>();
    const float* output_from_m = local[3][t].data_ptr<float>();
    const float* forget = local[4][t].data_ptr<float>();
    float* dp = d_pre[t].data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t row = b * hidden;
      float* d_input = dp + b * 3 * hidden;
      float* d_output = d_input + hidden;
      float* d_candidate = d_input + 2 * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        const float dcj = dc[row + j] + dm[row + j] * c_from_m[row + j];
        d_input[j] = dcj * input_from_c[row + j];
        d_candidate[j] = dcj * candidate_from_c[row + j];
        d_output[j] = dm[row + j] * output_from_m[row + j];
        dc[row + j] = dcj * forget[row + j];
      }
    }
    if (t > 0) {
      auto d_h_before = d_h_all[t - 1];
      at::addmm_out(d_h_before, d_outputs[t - 1], d_pre[t], recurrent_weight);
    }
  }
  auto d_h = at::mm(d_pre[0], recurrent_weight);
  auto d_recurrent = at::mm(d_pre.flatten(0, 1).t(), h_all.narrow(0, 0, steps).flatten(0, 1));
  auto d_projection = at::mm(d_h_all.flatten(0, 1).t(), m.flatten(0, 1));
  return {d_pre.transpose(0, 1), d_h, d_c, d_recurrent, d_projection};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("forward", &cifg_forward, "CIFG-LSTM walk over time, for training");
  module.def("backward", &cifg_backward, "Gradients of the CIFG-LSTM walk over time");
}
