// The engine's backward: the cell backward and dh_{t-1} = dgates_h W_hh per block
// of rows, the whole time loop of one layer and direction (design: cpu_engine.h).
// Written for any vector width: included once per instruction set after
// engine_common.h (see there).

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

// W_hh [G*H, H] in kPanel-column panels for dh = dgates_h W_hh:
// packed[nb][k][e] = W_hh[k][nb * kPanel + e], zero past H.
void pack_backward(const float* w_hh, int64_t G, int64_t H, std::vector<float>& w_packed) {
  const int64_t K = G * H;
  const int64_t blocks = (H + kPanel - 1) / kPanel;
  w_packed.assign(blocks * K * kPanel, 0.0f);
  for (int64_t nb = 0; nb < blocks; ++nb) {
    const int64_t width = std::min<int64_t>(kPanel, H - nb * kPanel);
    for (int64_t k = 0; k < K; ++k) {
      std::memcpy(w_packed.data() + (nb * K + k) * kPanel, w_hh + k * H + nb * kPanel, width * sizeof(float));
    }
  }
}

// dh_{t-1} rows [0, MR) = dgates_h rows W_hh (+ the direct path the GRU cell
// wrote into dh, when accumulate).
// The panels: packed (pack_backward: panel nb at w + nb * K * kPanel, rows
// kPanel apart) or W_hh itself (panel nb at w + nb * kPanel, rows H apart),
// which needs H to be a multiple of kPanel (the kernel reads whole panels).
struct BackwardPanels {
  const float* w = nullptr;
  int64_t panel_stride = 0, ldb = 0;
};

// Panels [nb0, nb1) of dh only (the unit split's part; nb1 -1: to the last).
template <int MR>
void backward_gemm(const float* dgates_h, int64_t G, int64_t H, const BackwardPanels& w, bool accumulate, float* dh,
                   int64_t nb0 = 0, int64_t nb1 = -1) {
  const int64_t K = G * H;
  const int64_t blocks = nb1 < 0 ? (H + kPanel - 1) / kPanel : nb1;
  for (int64_t nb = nb0; nb < blocks; ++nb) {
    const int64_t n0 = nb * kPanel;
    V acc[kMR][2];
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) {
        acc[m][v] = accumulate ? load_partial(dh + m * H + n0 + v * kVec, H - n0 - v * kVec) : Simd::zero();
      }
    }
    micro_kernel<MR>(K, dgates_h, K, w.w + nb * w.panel_stride, w.ldb, acc);
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < 2; ++v) store_partial(dh + m * H + n0 + v * kVec, acc[m][v], H - n0 - v * kVec);
    }
  }
}

// One block of MR rows of one step: the cell backward, then dh_{t-1} = dgates_h
// W_hh while the block's gate gradients are in L1 (unless `product` is false:
// the first step when dh0 is not needed). GRU's cell has written the direct
// path z * dh into dh, which the product adds to.
template <typename Cell, int MR>
__attribute__((noinline, flatten)) void backward_block(const cells::BackwardStepParams<float>& q,
                                                       const float* dgates_h, const BackwardPanels& w_packed,
                                                       float* dh, bool product) {
  constexpr int G = Cell::kGates;
  for (int m = 0; m < MR; ++m) {
#pragma omp simd simdlen(FUSEDRNN_ENGINE_SIMDLEN)
    for (int64_t j = 0; j < q.hidden; ++j) Cell::backward(q, m, j);
  }
  if (product) backward_gemm<MR>(dgates_h, G, q.hidden, w_packed, G == 3, dh);
}

// The previous states of rows [m0, m0 + mr) of a step whose rows [0, carried)
// continue the sequences at packed rows src_offset.. of `all` and the rest start
// from `init` (layer_backward.h: previous_rows): a pointer when the block lies on
// one side, else the rows copied into `tile` ([kMR, H]).
const float* previous_block(const float* all, const float* init, int64_t H, int64_t src_offset, int64_t carried,
                            int64_t m0, int64_t mr, float* tile) {
  if (m0 + mr <= carried) return all + (src_offset + m0) * H;
  if (m0 >= carried) return init + m0 * H;
  for (int64_t m = 0; m < mr; ++m) {
    const int64_t b = m0 + m;
    std::memcpy(tile + m * H, b < carried ? all + (src_offset + b) * H : init + b * H, H * sizeof(float));
  }
  return tile;
}

// The cell backward's view of rows [m0, m0 + mr) of the step whose tokens start at packed row `off`:
// its saved tensors and gradients in the packed sequence, its running gradients in the batch, its
// previous states (previous_block; `tile` for a block straddling carried rows), GRU's hidden-side
// gate gradients at `grad_gates_h`. Shared by the row split (backward_impl) and the unit split.
inline cells::BackwardStepParams<float> backward_rows(const BackwardArgs& args, int G, int64_t off, int64_t m0,
                                                      int64_t mr, const float* prev_all, const float* prev_init,
                                                      int64_t src_offset, int64_t carried, float* tile,
                                                      float* grad_gates_h) {
  const int64_t H = args.H;
  const int64_t row = off + m0;  // packed row of the block's first sequence
  cells::BackwardStepParams<float> q;
  q.batch = mr;
  q.hidden = H;
  q.gates = args.gates + row * G * H;
  q.grad_out = args.grad_output + row * H;
  q.grad_h_state = args.grad_h_state + m0 * H;
  if (args.grad_c_state != nullptr) q.grad_c_state = args.grad_c_state + m0 * H;
  if (args.cells != nullptr) q.cells = args.cells + row * H;
  if (prev_init != nullptr) {
    const float* prev = previous_block(prev_all, prev_init, H, src_offset, carried, m0, mr, tile);
    if (G == 3) {
      q.h_prev = prev;
    } else {
      q.c_prev = prev;
    }
  }
  if (args.hn != nullptr) q.hn = args.hn + row * H;
  q.out = args.output + row * H;
  q.grad_gates = args.grad_gates + row * G * H;
  if (G == 3) q.grad_gates_h = grad_gates_h + m0 * G * H;
  return q;
}

// The cell backward of rows [0, MR) for units [j0, j1) only (the unit split's part).
template <typename Cell, int MR>
__attribute__((noinline, flatten)) void backward_cell_units(const cells::BackwardStepParams<float>& q, int64_t j0,
                                                            int64_t j1) {
  for (int m = 0; m < MR; ++m) {
#pragma omp simd simdlen(FUSEDRNN_ENGINE_SIMDLEN)
    for (int64_t j = j0; j < j1; ++j) Cell::backward(q, m, j);
  }
}

// The backward of a uniform batch split by hidden units (the forward's split: engine_forward.h,
// split_loop): part p owns whole kPanel-unit panels of dh. Step k: each worker runs the cell backward on
// its units of every row, waits at the step's barrier (every gate gradient of the step is then written),
// and, as the first work of step k + 1, computes its panels of dh_{t-1} = dgates_h W_hh over all gate
// columns: the units its own cell backward reads next, so one barrier a step. GRU's hidden-side gate
// gradients, one step's scratch, alternate between two buffers: a worker writes step k + 1's while
// another may still multiply by step k's. Bitwise the batch split's numbers (every element's sums in the
// same order). Returns the steps run (split_loop: fewer where the split was losing).
template <typename Cell>
int64_t backward_split(const BackwardArgs& args, int64_t parts, bool forced, const BackwardPanels& w_packed) {
  constexpr int G = Cell::kGates;
  constexpr bool is_gru = G == 3;
  const int64_t H = args.H, B = args.B;
  const int64_t panels = (H + kPanel - 1) / kPanel;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(offset.size());
  const float* prev_all = is_gru ? args.output : args.cells;
  const float* prev_init = is_gru ? args.h0 : args.c0;
  std::vector<float> gates_h(is_gru ? B * G * H : 0);  // GRU: the second scratch buffer
  auto step_of = [&](int64_t k) { return args.sched.reverse ? k : T - 1 - k; };
  auto dgates_h_of = [&](int64_t k) -> float* {  // step k's [B, G*H] hidden-side gate gradients
    if (is_gru) return k % 2 == 0 ? args.grad_gates_h : gates_h.data();
    return args.grad_gates + offset[step_of(k)] * G * H;
  };
  // dh_{t-1} of step k, this worker's panels.
  auto product = [&](int64_t k, int64_t first, int64_t last) {
    if (!(args.need_grad_h0 || k < T - 1)) return;
    const float* dgates_h = dgates_h_of(k);
    const int64_t nb0 = part_bound(first, parts, panels), nb1 = part_bound(last, parts, panels);
    for_each_row_block(0, B, [&](int64_t m0, int64_t mr) {
      with_rows(mr, [&](auto rows) {
        backward_gemm<rows.value>(dgates_h + m0 * G * H, G, H, w_packed, is_gru, args.grad_h_state + m0 * H, nb0, nb1);
      });
    });
  };
  return split_loop(parts, T, forced, [&](int64_t k, int64_t first, int64_t last) {
    if (k > 0) product(k - 1, first, last);
    const int64_t t = step_of(k);
    const int64_t off = offset[t];
    const int64_t src = args.sched.reverse ? t + 1 : t - 1;  // the step before t in the forward's order
    const bool has_src = src >= 0 && src < T;
    const int64_t src_offset = has_src ? offset[src] : 0;
    // Every row continues a sequence or none does (a uniform batch): previous_block never copies.
    const int64_t carried = has_src ? B : 0;
    const int64_t j0 = std::min(H, part_bound(first, parts, panels) * kPanel);
    const int64_t j1 = std::min(H, part_bound(last, parts, panels) * kPanel);
    float* gh = is_gru ? dgates_h_of(k) : nullptr;
    for_each_row_block(0, B, [&](int64_t m0, int64_t mr) {
      const cells::BackwardStepParams<float> q =
          backward_rows(args, G, off, m0, mr, prev_all, prev_init, src_offset, carried, nullptr, gh);
      with_rows(mr, [&](auto rows) { backward_cell_units<Cell, rows.value>(q, j0, j1); });
    });
  }, product);
}

// pack_backward's panels of args.w_hh: packed here, or the previous call's from args.pack_cache where it
// packed the same W_hh (cpu_engine.h: PackCache; `tag` as forward_panels').
struct CachedBackwardPack {
  const float* w_hh = nullptr;
  int64_t G = 0, H = 0;
  std::vector<float> packed;
};

inline std::shared_ptr<const CachedBackwardPack> backward_pack(const BackwardArgs& args, int64_t G) {
  static char tag;  // as forward_panels'
  return cached_entry<CachedBackwardPack>(
      args.pack_cache != nullptr ? &args.pack_cache->backward : nullptr, &tag,
      [&](const CachedBackwardPack& e) { return e.w_hh == args.w_hh && e.G == G && e.H == args.H; },
      [&](CachedBackwardPack& e) {
        e.w_hh = args.w_hh;
        e.G = G;
        e.H = args.H;
        pack_backward(args.w_hh, G, args.H, e.packed);
      });
}

template <typename Cell>
void backward_impl(const BackwardArgs& args) {
  constexpr int G = Cell::kGates;
  constexpr bool is_gru = G == 3;
  const int64_t H = args.H;
  // Small calls read W_hh in place (no copy: it is used a few times only).
  std::shared_ptr<const CachedBackwardPack> packed;
  BackwardPanels w_packed;
  if (args.small && H % kPanel == 0) {
    w_packed = {args.w_hh, kPanel, H};
  } else {
    packed = backward_pack(args, G);
    w_packed = {packed->packed.data(), G * H * kPanel, kPanel};
  }
  const std::vector<int64_t>& batch = *args.sched.batch;
  const std::vector<int64_t>& offset = *args.sched.offset;
  const int64_t T = static_cast<int64_t>(batch.size());
  // Previous states: GRU's cell reads h_{t-1}, LSTM's c_{t-1}.
  const float* prev_all = is_gru ? args.output : args.cells;
  const float* prev_init = is_gru ? args.h0 : args.c0;
  int64_t k_start = 0;  // steps already run by the unit split
  const int force = args.small ? 0 : split_switch("FUSEDRNN_CPU_UNIT_SPLIT");
  const int64_t parts = args.small ? 1 : packed_split_parts(args.sched, args.B, (H + kPanel - 1) / kPanel, force);
  if (parts > 1) {
    k_start = backward_split<Cell>(args, parts, force == 1, w_packed);
    if (k_start == T) return;
  }

  for_each_thread_rows(args.sched, args.B, [&](int64_t lo, int64_t hi) {
    std::vector<float> tile(prev_init != nullptr ? kMR * H : 0);
    for (int64_t k = k_start; k < T; ++k) {
      const int64_t t = args.sched.reverse ? k : T - 1 - k;  // reverse of the forward's order
      const int64_t end = std::min(hi, batch[t]);
      const int64_t off = offset[t];
      const int64_t src = args.sched.reverse ? t + 1 : t - 1;  // the step before t in the forward's order
      const bool has_src = src >= 0 && src < T;
      const int64_t src_offset = has_src ? offset[src] : 0;
      const int64_t carried = has_src ? std::min(batch[t], batch[src]) : 0;
      // The last step processed is the sequence's first: its dh_{t-1} is dh0 alone.
      const bool product = args.need_grad_h0 || k < T - 1;
      for_each_row_block(lo, end, [&](int64_t m0, int64_t mr) {
        const int64_t row = off + m0;  // packed row of the block's first sequence
        const cells::BackwardStepParams<float> q = backward_rows(args, G, off, m0, mr, prev_all, prev_init, src_offset,
                                                                 carried, tile.data(), args.grad_gates_h);
        const float* dgates_h = is_gru ? args.grad_gates_h + m0 * G * H : args.grad_gates + row * G * H;
        float* dh = args.grad_h_state + m0 * H;
        with_rows(mr, [&](auto rows) { backward_block<Cell, rows.value>(q, dgates_h, w_packed, dh, product); });
      });
    }
  });
}


// The backward of one layer call (what the instruction set's backward() runs).
inline void run_backward(const BackwardArgs& a) {
  with_cell(a.cell, [&](auto cell) { backward_impl<decltype(cell)>(a); });
}
