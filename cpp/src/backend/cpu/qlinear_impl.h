// The W4A8 linear kernel body over the tiled weight layout (quant/q4.h, Q4Tiled), compiled once
// per dot-product instruction set: qlinear_*.cc define a struct D with
//   Acc                   16 int32 lanes, one per output row of a 16-row block
//   W unpack(w64)         the 64 bytes of one 8-channel step as two sets of 4-bit lanes
//   dot(acc, w, x8)       acc[r] += sum over c < 8 of weight(r, c) * x8[c]
//   finish(acc, sw, z, sx, xsum, y16)
//                         y16[r] = fma(sw[r] * sx, float(acc[r] - z[r] * xsum), y16[r])
//                         (once per weight group: W4A8)
//   accumulate(acc, sx, t16)  t16[r] = fma(sx, float(acc[r]), t16[r])  (per FMPQ sub-group)
//   finish_group(t16, sw, z, zsum, y16)
//                         y16[r] = fma(sw[r], fma(-float(z[r]), zsum, t16[r]), y16[r])  (per group)
// and kAsmBlocks, kAsmRows: where they are NB and MB, D::asm_steps(acc, wg, x, ldx, j0, j1) sets
// acc to the sums over steps j0 to j1 of the NB blocks' weight groups wg against the MB rows'
// group activations (x, rows ldx apart), in place of zero, unpack and dot (0: none), and for
// W4A8 D::asm_group(wg, x, ldx, steps, f) does a whole group's steps and finish() with the
// operands in f (a D::GroupFinish); and
// kSubAsmBlocks, kSubAsmRows: likewise D::asm_sub_steps(t, wg, x, ldx, sx, lds, steps) sets the
// float sums t of a whole group for FMPQ's 8-channel sub-groups, in place of the sub-group loop
// (and from kSubAsmRows rows on the blocking is that one; with kSubAsmFewerRows, asm_sub_steps
// also takes fewer rows);
// and for W8A8 on split 8-bit rows (QLinearParams::w8_lo_block) kW8Combined: if true,
// D::unpack8(h64, l64) gives a step's 8-bit weights 16 h + l from its two halves as a W, and
// D::asm_group_w8(wh, wl, x, ldx, steps, f) is asm_group on them; if false, each half is summed
// on its own and D::combine(h, l) gives 16 h + l: the same integers either way;
// and include this. The integer sums are exact whatever the instructions, and finish is the same
// lane-wise float arithmetic on every path, so all paths give the same bits, and a row's result
// does not depend on the batch (each row of x runs the same instruction sequence).
//
// Not a standalone header: the including file defines the namespace.

// Software prefetch distance, in 64-byte weight steps (2 KB ahead): the hardware prefetcher alone
// keeps too few lines in flight. TinyLlama shape, 2 threads: batch 1 decode 56-61 -> 75-77
// tokens/s, batch 16 293 -> 324 (distances 16 to 128 measured; 32 was steadiest).
constexpr int64_t PF = 32;

// NB consecutive 16-row blocks by P passes of MB activation rows: each broadcast activation feeds
// NB weight vectors, each unpacked weight vector MB activation rows, and a weight group is read
// by the P passes in turn while it is in L1 (then the next group's stream from memory overlaps
// all P passes' arithmetic, instead of one pass streaming the whole row block and the others
// computing from L2).
template <class D, int NB, int MB, int P, bool kSub, bool kW8>
void qlinear_block(const QLinearParams& p, int64_t b0, int64_t m0) {
  static_assert(!(kSub && kW8));
  constexpr int64_t R = Q4Tiled::kRows;
  constexpr int M = P * MB;  // activation rows in all
  const int64_t G = p.groups, gs = p.group, steps = gs / 8, kp = G * gs;
  alignas(64) float y[NB][M][R];
  for (int nb = 0; nb < NB; ++nb) {
    const int64_t rows = std::min<int64_t>(R, p.n - (b0 + nb) * R);
    // Whole rows by memcpy: scalar stores read back as one vector would stall store forwarding.
    for (int i = 0; i < M; ++i)
      if (p.bias && rows == R)
        std::memcpy(y[nb][i], p.bias + (b0 + nb) * R, sizeof y[nb][i]);
      else
        for (int64_t r = 0; r < R; ++r) y[nb][i][r] = p.bias && r < rows ? p.bias[(b0 + nb) * R + r] : 0.0f;
  }
  const int8_t* x[M];
  for (int i = 0; i < M; ++i) x[i] = p.xq + (m0 + i) * kp;
  // Activation scale groups: the weight group itself (W4A8: one int32 sum, finished with the
  // exact integer zero-point term), or its sub-groups (FMPQ: each int32 sum scaled into a float
  // sum t, the zero-point term folded into one per group, x_zsums).
  const int64_t ag = p.act_group ? p.act_group : gs, subs = gs / ag, sub_steps = ag / 8, AG = G * subs;
  alignas(64) float t[NB][MB][R];  // one pass's, for one group
  for (int64_t g = 0; g < G; ++g) {
    // The group's weights, scales and zero points per block (W8: its high half's weights, the
    // low half's weights and scales, the zero points combined).
    const uint8_t* wg[NB];
    const uint8_t* wl[NB] = {};
    const float* sw[NB];
    const uint8_t* z[NB];
    uint8_t z8[kW8 ? NB : 1][R];
    for (int nb = 0; nb < NB; ++nb) {
      const int64_t hi = (b0 + nb) * G + g, lo = kW8 ? (b0 + nb + p.w8_lo_block) * G + g : hi;
      wg[nb] = p.w + hi * steps * 64;
      sw[nb] = p.w_scales + lo * R;
      z[nb] = p.w_zeros + hi * R;
      if constexpr (kW8) {
        wl[nb] = p.w + lo * steps * 64;
        for (int64_t r = 0; r < R; ++r) z8[nb][r] = static_cast<uint8_t>(16 * z[nb][r] + p.w_zeros[lo * R + r]);
        z[nb] = z8[nb];
      }
    }
    for (int pass = 0; pass < P; ++pass) {
      const int i0 = pass * MB;  // the pass's first row (of M)
      if constexpr (!kSub && NB == D::kAsmBlocks && MB == D::kAsmRows && (!kW8 || D::kW8Combined)) {
        typename D::GroupFinish f;
        for (int nb = 0; nb < NB; ++nb) {
          f.sw[nb] = sw[nb];
          f.z[nb] = z[nb];
          f.y[nb] = y[nb][i0];
        }
        for (int i = 0; i < MB; ++i) {
          const int64_t a = (m0 + i0 + i) * AG + g;  // one activation group per weight group
          f.sx[i] = p.x_scales[a];
          f.xsum[i] = p.x_sums[a];
        }
        if constexpr (kW8)
          D::asm_group_w8(wg, wl, x[i0] + g * gs, kp, steps, f);
        else
          D::asm_group(wg, x[i0] + g * gs, kp, steps, f);
        continue;
      }
      bool summed = false;  // t already holds the group's sub-group sums
      if constexpr (kSub && NB == D::kSubAsmBlocks &&
                    (MB == D::kSubAsmRows || (D::kSubAsmFewerRows && MB < D::kSubAsmRows))) {
        if (ag == 8) {
          D::asm_sub_steps(t, wg, x[i0] + g * gs, kp, p.x_scales + (m0 + i0) * AG + g * subs, AG, steps);
          summed = true;
        }
      }
      if constexpr (kSub)
        if (!summed)
          for (int nb = 0; nb < NB; ++nb)
            for (int i = 0; i < MB; ++i)
              for (int64_t r = 0; r < R; ++r) t[nb][i][r] = 0.0f;
      for (int64_t s = 0; s < (summed ? 0 : subs); ++s) {
        typename D::Acc acc[NB][MB];
        if constexpr (!kW8 && NB == D::kAsmBlocks && MB == D::kAsmRows) {
          D::asm_steps(acc, wg, x[i0] + g * gs, kp, s * sub_steps, (s + 1) * sub_steps);
        } else {
          // The sums over weights at w (each block's at w[nb]) into a.
          auto sum_steps = [&](typename D::Acc(&a)[NB][MB], const uint8_t* const(&w)[NB], bool w8) {
            for (int nb = 0; nb < NB; ++nb)
              for (int i = 0; i < MB; ++i) a[nb][i] = D::zero();
            for (int64_t j = s * sub_steps; j < (s + 1) * sub_steps; ++j) {
              typename D::W wv[NB];
              for (int nb = 0; nb < NB; ++nb) {
                __builtin_prefetch(w[nb] + (j + PF) * 64);
                if constexpr (kW8 && D::kW8Combined) {
                  if (w8) {
                    __builtin_prefetch(wl[nb] + (j + PF) * 64);
                    wv[nb] = D::unpack8(w[nb] + j * 64, wl[nb] + j * 64);
                    continue;
                  }
                }
                wv[nb] = D::unpack(w[nb] + j * 64);
              }
              for (int i = 0; i < MB; ++i) {
                const int8_t* xi = x[i0 + i] + g * gs + 8 * j;
                for (int nb = 0; nb < NB; ++nb) D::dot(a[nb][i], wv[nb], xi);
              }
            }
          };
          sum_steps(acc, wg, kW8);
          if constexpr (kW8 && !D::kW8Combined) {  // the low half on its own, then 16 h + l
            typename D::Acc low[NB][MB];
            sum_steps(low, wl, false);
            for (int nb = 0; nb < NB; ++nb)
              for (int i = 0; i < MB; ++i) acc[nb][i] = D::combine(acc[nb][i], low[nb][i]);
          }
        }
        for (int nb = 0; nb < NB; ++nb) {
          for (int i = 0; i < MB; ++i) {
            const int64_t a = (m0 + i0 + i) * AG + g * subs + s;
            if constexpr (kSub)
              D::accumulate(acc[nb][i], p.x_scales[a], t[nb][i]);
            else
              D::finish(acc[nb][i], sw[nb], z[nb], p.x_scales[a], p.x_sums[a], y[nb][i0 + i]);
          }
        }
      }
      if constexpr (kSub)
        for (int nb = 0; nb < NB; ++nb)
          for (int i = 0; i < MB; ++i)
            D::finish_group(t[nb][i], sw[nb], z[nb], p.x_zsums[(m0 + i0 + i) * G + g], y[nb][i0 + i]);
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    const int64_t rows = std::min<int64_t>(R, p.n - (b0 + nb) * R);
    for (int i = 0; i < M; ++i) {
      float* dst = p.y + (m0 + i) * p.ldy + (b0 + nb) * R;
      if (rows == R)
        std::memcpy(dst, y[nb][i], sizeof y[nb][i]);  // fixed size: vector moves, not rep movs
      else
        std::memcpy(dst, y[nb][i], rows * sizeof(float));
    }
  }
}

template <class D, int NB, int MB, int P, bool kSub, bool kW8>
void qlinear_blocks(const QLinearParams& p, int64_t b) {
  int64_t m = 0;
  for (; m + P * MB <= p.m; m += P * MB) qlinear_block<D, NB, MB, P, kSub, kW8>(p, b, m);
  for (; m + MB <= p.m; m += MB) qlinear_block<D, NB, MB, 1, kSub, kW8>(p, b, m);
  for (; m + 4 <= p.m; m += 4) qlinear_block<D, NB, 4, 1, kSub, kW8>(p, b, m);
  switch (p.m - m) {
    case 3: qlinear_block<D, NB, 3, 1, kSub, kW8>(p, b, m); break;
    case 2: qlinear_block<D, NB, 2, 1, kSub, kW8>(p, b, m); break;
    case 1: qlinear_block<D, NB, 1, 1, kSub, kW8>(p, b, m); break;
    default: break;
  }
}

// NB row blocks by P passes of MB activation rows where they fit, then one block at a time.
template <class D, int NB, int MB, int P, bool kSub, bool kW8>
void qlinear_rows_by(const QLinearParams& p, int64_t n0, int64_t n1) {
  constexpr int64_t R = Q4Tiled::kRows;
  const int64_t end = (n1 + R - 1) / R;
  int64_t b = n0 / R;
  for (; b + NB <= end; b += NB) qlinear_blocks<D, NB, MB, P, kSub, kW8>(p, b);
  for (; b < end; ++b) qlinear_blocks<D, 1, MB, P, kSub, kW8>(p, b);
}

// D::kBlocks blocks by 4 rows; from D::kWideRows activation rows on, D::kWideBlocks blocks by
// that many rows (fewer passes over each block's weights), kPasses of them per weight group. The
// blocking changes only which outputs are computed together, never how one is, so the results
// are the same bits. FMPQ's sub-groups get their own instantiation (kSub), so neither path
// branches in its inner loop.
template <class D, bool kSub, bool kW8>
void qlinear_rows_sub(const QLinearParams& p, int64_t n0, int64_t n1) {
  constexpr int kPasses = 2;
  if constexpr (kSub && D::kSubAsmRows > 0) {
    if (p.act_group == 8 && p.m >= D::kSubAsmRows)
      return qlinear_rows_by<D, D::kSubAsmBlocks, D::kSubAsmRows, 2 * kPasses, kSub, kW8>(p, n0, n1);
  }
  if (D::kWideRows > 4 && p.m >= D::kWideRows)
    return qlinear_rows_by<D, D::kWideBlocks, D::kWideRows, kPasses, kSub, kW8>(p, n0, n1);
  qlinear_rows_by<D, D::kBlocks, 4, 1, kSub, kW8>(p, n0, n1);
}

template <class D>
void qlinear_rows(const QLinearParams& p, int64_t n0, int64_t n1) {
  if (p.w8_lo_block) return qlinear_rows_sub<D, false, true>(p, n0, n1);
  if (p.act_group && p.act_group < p.group) return qlinear_rows_sub<D, true, false>(p, n0, n1);
  qlinear_rows_sub<D, false, false>(p, n0, n1);
}
