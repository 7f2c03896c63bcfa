//! Scaled dot-product attention on the CPU as one op with a hand-written
//! backward: scores, mask, softmax and the weighted sum of values per
//! (sequence, key/value head, query position), reading keys and values
//! through their strides (straight out of the KV cache when decoding).
//!
//! Why by hand: composed from candle ops, attention allocates half a dozen
//! [B, H, T, S] tensors forward and, with candle's zero-then-add gradient
//! accumulation, three times as many backward: 4 of the 10 seconds of a
//! SmolLM2 training step of 4 × 256 tokens, and at decode time a tangle of
//! tiny batched gemm calls. Here nothing [T, S]-sized is ever stored: the
//! backward recomputes each position's probabilities, as flash attention does.
//!
//! How the work is laid out, and why:
//! - Only visible keys are touched. The mask rows are read once per call into
//!   runs of visible keys; a query of a packed GRPO row (a shared prompt, then
//!   completions that each see the prompt and themselves) visits its prompt
//!   and its own completion, not the other completions.
//! - The `rep` query heads that share a key/value head at one position also
//!   share its mask row, so they are computed together: each key or value row
//!   loaded from cache feeds every head of the group (register tiles of heads
//!   × keys for the scores, heads × head-dim for the weighted sums), and a
//!   position's outputs are accumulated in registers, not in memory.
//! - Work items are (sequence, key/value head, every n-th position), enough of
//!   them to keep every thread busy when there are few heads (a packed GRPO
//!   row has one sequence and 2–3 key/value heads). Positions are interleaved
//!   so that causal rows, whose cost grows with the position, balance.
//!
//! Every score is the same dot product (8-lane FMA partial sums over the head
//! dimension in order, then a fixed reduction tree) and every weighted sum
//! runs over the visible keys in order, whatever the batch, the padding, the
//! tiling or the thread split: a sequence gets bitwise the same attention
//! alone or in a batch. The key/value gradients of one key/value head are
//! summed over a fixed number of position classes in a fixed order, so
//! training is deterministic too.
//!
//! Backward, per query row with probabilities p and output gradient dO:
//! dV_j += p_j dO, dP_j = dO · V_j, dS_j = p_j (dP_j − Σ_k p_k dP_k),
//! dQ = scale Σ_j dS_j K_j, dK_j += scale dS_j Q.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::matmul_t::dot;
use super::threads::{for_each_unit, SharedOut};

/// A mask entry at or below this is a masked key (the model uses −1e9).
const MASKED_BELOW: f32 = -1e8;

/// Work items to aim for per call: (sequence, key/value head) units are split
/// into interleaved position classes until there are at least this many.
const WORK_ITEMS: usize = 16;

/// Whether the CPU attention applies (the kernels' dispatch rule): else the
/// caller composes attention from candle ops, as CUDA runs it.
pub fn applies(q: &Tensor) -> bool {
    super::cpu_form(&[q])
}

/// softmax(q kᵀ · scale + mask) v per head; differentiable in q, k and v.
///
/// `q` [B, Hkv, R, D]: the R = rep × T query rows that share key/value head h,
/// row r being query position r mod T. `k`, `v` [B, Hkv, S, D], any strides with
/// a contiguous last dimension (a view into the KV cache). `mask` [B, 1, T, S]:
/// the additive bias (no gradient). Returns [B, Hkv, R, D].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, hkv, r, d) = q.dims4()?;
    let s = k.dim(2)?;
    let t = mask.dim(2)?;
    if k.dims4()? != (b, hkv, s, d) || v.dims4()? != (b, hkv, s, d) || mask.dims4()? != (b, 1, t, s) || r % t != 0 {
        candle_core::bail!(
            "cpu attention: shapes q {:?} k {:?} v {:?} mask {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.dims()
        );
    }
    q.apply_op3(k, v, Attention { mask: mask.contiguous()?.detach(), scale: scale as f32 })
}

struct Attention {
    mask: Tensor,
    scale: f32,
}

/// An f32 tensor of rank 4 read through its strides; rows along the last dimension.
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 3],
    d: usize,
}

impl<'a> Rows<'a> {
    fn new(data: &'a [f32], l: &Layout) -> Result<Rows<'a>> {
        let st = l.stride();
        if l.dims().len() != 4 || st[3] != 1 {
            candle_core::bail!("cpu attention: expected rank 4 with a contiguous last dimension, got {l:?}");
        }
        let rows = Rows { data, offset: l.start_offset(), stride: [st[0], st[1], st[2]], d: l.dims()[3] };
        // Every row the kernels may touch lies inside `data` (they read through raw pointers).
        let dims = l.dims();
        let last = rows.offset + (0..3).map(|i| dims[i].saturating_sub(1) * st[i]).sum::<usize>() + rows.d;
        if dims.iter().all(|&n| n > 0) && last > data.len() {
            candle_core::bail!("cpu attention: layout {l:?} reaches past its storage");
        }
        Ok(rows)
    }

    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize) -> &'a [f32] {
        let o = self.offset + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[o..o + self.d]
    }

    /// Row `c0` of (a, b) and the distance between consecutive rows: a run of
    /// keys `c0..c0 + n` is `n` rows from there (bounds checked by `row`).
    #[inline(always)]
    fn run(&self, a: usize, b: usize, c0: usize, n: usize) -> (*const f32, usize) {
        if n > 0 {
            let _ = self.row(a, b, c0 + n - 1);
        }
        (self.row(a, b, c0).as_ptr(), self.stride[2])
    }
}

/// The visible keys of every query position: runs of consecutive keys whose
/// mask entry is above [`MASKED_BELOW`], read once per call.
struct Visibility {
    runs: Vec<Range<usize>>,
    /// `runs[starts[bt]..starts[bt + 1]]` are the runs of (sequence, position) bt.
    starts: Vec<usize>,
}

impl Visibility {
    fn of(mask: &[f32], bt: usize, s: usize) -> Visibility {
        let (mut runs, mut starts) = (Vec::new(), Vec::with_capacity(bt + 1));
        for row in mask[..bt * s].chunks_exact(s) {
            starts.push(runs.len());
            let mut j = 0;
            while j < s {
                if row[j] > MASKED_BELOW {
                    let start = j;
                    while j < s && row[j] > MASKED_BELOW {
                        j += 1;
                    }
                    runs.push(start..j);
                } else {
                    j += 1;
                }
            }
        }
        starts.push(runs.len());
        Visibility { runs, starts }
    }

    fn of_row(&self, bt: usize) -> &[Range<usize>] {
        &self.runs[self.starts[bt]..self.starts[bt + 1]]
    }
}

/// The shapes of one call, and the kernels over one (sequence, head, position).
struct Unit<'a> {
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    mask: &'a [f32],
    visible: Visibility,
    /// One run of every key: what a fully masked query row (a padding position)
    /// attends to, each key weighted by its mask alone (uniform for an all-equal
    /// mask, as the composed ops give; never NaN).
    all_keys: [Range<usize>; 1],
    hkv: usize,
    rep: usize,
    t: usize,
    s: usize,
    d: usize,
    scale: f32,
}

/// Per-thread buffers of one work item, sized for a whole position.
struct Scratch {
    /// Per head: scores, then probabilities, of the position's visible keys.
    p: Vec<f32>,
    /// Per head: dO · V_j (backward).
    dp: Vec<f32>,
}

impl<'a> Unit<'a> {
    /// The kernels' view of one call: q [B, Hkv, R, D], k and v [B, Hkv, S, D],
    /// the [B, 1, T, S] mask from its first element.
    #[allow(clippy::too_many_arguments)]
    fn new(
        q: Rows<'a>,
        k: Rows<'a>,
        v: Rows<'a>,
        mask: &'a [f32],
        b: usize,
        hkv: usize,
        r: usize,
        t: usize,
        s: usize,
        scale: f32,
    ) -> Self {
        let visible = Visibility::of(mask, b * t, s);
        #[allow(clippy::single_range_in_vec_init)] // one run: keys 0..s
        let all_keys = [0..s];
        Unit { q, k, v, mask, visible, all_keys, hkv, rep: r / t, t, s, d: q.d, scale }
    }

    /// The runs of keys position `pos` of sequence `bi` attends to, and whether it
    /// is fully masked (then every key, weighted by its mask alone), and their count.
    fn runs(&self, bi: usize, pos: usize) -> (&[Range<usize>], bool, usize) {
        let visible = self.visible.of_row(bi * self.t + pos);
        let (runs, all) = if visible.is_empty() { (&self.all_keys[..], true) } else { (visible, false) };
        (runs, all, runs.iter().map(|r| r.len()).sum())
    }

    /// Query rows of the `rep` heads at `pos`, as pointers (for the kernels).
    fn heads(&self, x: Rows, bi: usize, h: usize, pos: usize) -> Vec<*const f32> {
        (0..self.rep).map(|g| x.row(bi, h, g * self.t + pos).as_ptr()).collect()
    }

    /// Normalized probabilities [rep × n] of position `pos`'s visible keys into `p`.
    fn probs(&self, bi: usize, h: usize, pos: usize, runs: &[Range<usize>], all: bool, p: &mut [f32]) {
        let n = p.len() / self.rep;
        let mrow = &self.mask[(bi * self.t + pos) * self.s..][..self.s];
        if all {
            for ph in p.chunks_exact_mut(n) {
                ph.copy_from_slice(mrow);
            }
        } else {
            let qs = self.heads(self.q, bi, h, pos);
            let mut at = 0;
            for run in runs {
                let (k0, ks) = self.k.run(bi, h, run.start, run.len());
                // SAFETY: the rows of q and k are in bounds (`heads`, `run`), each head's
                // block of `p` holds n ≥ at + run.len() entries.
                unsafe { kernels::dots(&qs, k0, ks, run.len(), self.d, p.as_mut_ptr().add(at), n) };
                let m = &mrow[run.clone()];
                for ph in p.chunks_exact_mut(n) {
                    for (x, &mv) in ph[at..at + run.len()].iter_mut().zip(m) {
                        *x = *x * self.scale + mv;
                    }
                }
                at += run.len();
            }
        }
        for ph in p.chunks_exact_mut(n) {
            super::row_exp::softmax_in_place(ph);
        }
    }

    /// `out_g += Σ_j c[g][j] x_j` over the keys of `runs`, for every head g.
    ///
    /// # Safety
    /// `out` rows (D floats each) belong to this work item alone.
    unsafe fn gather(&self, x: Rows, bi: usize, h: usize, runs: &[Range<usize>], c: &[f32], out: &[*mut f32]) {
        let n = c.len() / self.rep;
        let mut at = 0;
        for run in runs {
            let (x0, xs) = x.run(bi, h, run.start, run.len());
            kernels::axpys(c.as_ptr().add(at), n, x0, xs, run.len(), self.d, out);
            at += run.len();
        }
    }

    /// Output rows of the positions `positions` of unit u (a sequence and key/value head).
    ///
    /// # Safety
    /// `out` is the [B, Hkv, R, D] output; only this call writes these positions' rows.
    unsafe fn forward(&self, u: usize, positions: impl Iterator<Item = usize>, out: SharedOut<f32>, sc: &mut Scratch) {
        let (bi, h) = (u / self.hkv, u % self.hkv);
        for pos in positions {
            let (runs, all, n) = self.runs(bi, pos);
            sc.p.resize(self.rep * n, 0.0);
            self.probs(bi, h, pos, runs, all, &mut sc.p);
            let rows: Vec<*mut f32> =
                (0..self.rep).map(|g| out.ptr().add(((u * self.rep + g) * self.t + pos) * self.d)).collect();
            self.gather(self.v, bi, h, runs, &sc.p, &rows);
        }
    }

    /// Gradients of the positions `positions` of unit u: their rows of `dq`, and
    /// their contributions added to `dk`, `dv` (the unit's S × D blocks, or a
    /// partial sum of them that only this work item writes).
    ///
    /// # Safety
    /// `dq` is the [B, Hkv, R, D] gradient, whose rows of these positions only
    /// this call writes; `dk`, `dv` point at S × D blocks only this call writes.
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &self,
        u: usize,
        positions: impl Iterator<Item = usize>,
        grad: Rows,
        dq: SharedOut<f32>,
        dk: *mut f32,
        dv: *mut f32,
        sc: &mut Scratch,
    ) {
        let (bi, h) = (u / self.hkv, u % self.hkv);
        for pos in positions {
            let (runs, all, n) = self.runs(bi, pos);
            sc.p.resize(self.rep * n, 0.0);
            sc.dp.resize(self.rep * n, 0.0);
            self.probs(bi, h, pos, runs, all, &mut sc.p);
            let gs = self.heads(grad, bi, h, pos);
            // dP_j = dO · V_j for every visible key.
            let mut at = 0;
            for run in runs {
                let (v0, vs) = self.v.run(bi, h, run.start, run.len());
                kernels::dots(&gs, v0, vs, run.len(), self.d, sc.dp.as_mut_ptr().add(at), n);
                at += run.len();
            }
            // dV_j += Σ_g p_gj dO_g
            self.scatter(runs, &sc.p, &gs, dv);
            // A fully masked row (padding, whose output nothing reads) takes the
            // gradient of the composed ops, softmax(q·k·scale + mask) over every key.
            // dS = p (dP − Σ p dP) · scale, kept in dp.
            for (ph, dph) in sc.p.chunks_exact(n).zip(sc.dp.chunks_exact_mut(n)) {
                let delta: f32 = ph.iter().zip(dph.iter()).map(|(a, b)| a * b).sum();
                for (x, &pj) in dph.iter_mut().zip(ph) {
                    *x = pj * (*x - delta) * self.scale;
                }
            }
            let rows: Vec<*mut f32> =
                (0..self.rep).map(|g| dq.ptr().add(((u * self.rep + g) * self.t + pos) * self.d)).collect();
            self.gather(self.k, bi, h, runs, &sc.dp, &rows);
            let qs = self.heads(self.q, bi, h, pos);
            self.scatter(runs, &sc.dp, &qs, dk);
        }
    }

    /// `dst_j += Σ_g c[g][j] x_g` for every visible key j (dst: an S × D block).
    unsafe fn scatter(&self, runs: &[Range<usize>], c: &[f32], xs: &[*const f32], dst: *mut f32) {
        let n = c.len() / self.rep;
        let mut at = 0;
        for run in runs {
            kernels::rank_updates(c.as_ptr().add(at), n, xs, run.len(), self.d, dst.add(run.start * self.d));
            at += run.len();
        }
    }
}

impl Scratch {
    fn new() -> Scratch {
        Scratch { p: Vec::new(), dp: Vec::new() }
    }
}

/// How many interleaved position classes each (sequence, key/value head) unit is
/// split into: enough work items for every thread, never more classes than positions.
fn classes(units: usize, t: usize) -> usize {
    WORK_ITEMS.div_ceil(units.max(1)).clamp(1, t.max(1))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mask_storage, mask_layout) = self.mask.storage_and_layout();
        let Storage::Cpu(mask_cpu) = &*mask_storage else { candle_core::bail!("cpu attention: mask not on the CPU") };
        let (b, hkv, r, d) = l1.shape().dims4()?;
        let (t, s) = (self.mask.dim(2)?, l2.dims()[2]);
        let unit = Unit::new(
            Rows::new(s1.as_slice::<f32>()?, l1)?,
            Rows::new(s2.as_slice::<f32>()?, l2)?,
            Rows::new(s3.as_slice::<f32>()?, l3)?,
            &mask_cpu.as_slice::<f32>()?[mask_layout.start_offset()..],
            b,
            hkv,
            r,
            t,
            s,
            self.scale,
        );
        let mut out = vec![0f32; b * hkv * r * d];
        let shared = SharedOut::new(&mut out);
        let classes = classes(b * hkv, t);
        for_each_unit(b * hkv * classes, r * s * d > 1 << 12, |items| {
            let mut sc = Scratch::new();
            for w in items {
                let (u, class) = (w / classes, w % classes);
                // SAFETY: item w writes only the rows of its unit's positions ≡ class.
                unsafe { unit.forward(u, (class..t).step_by(classes), shared, &mut sc) };
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, hkv, r, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, hkv, r, d) = q.dims4()?;
        let (t, s) = (self.mask.dim(2)?, k.dim(2)?);
        let locked = [q, k, v, grad, &self.mask].map(|x| x.storage_and_layout());
        let mut slices = Vec::with_capacity(5);
        for (st, l) in &locked {
            let Storage::Cpu(c) = &**st else { candle_core::bail!("cpu attention: tensor not on the CPU") };
            slices.push((c.as_slice::<f32>()?, *l));
        }
        let rows = |i: usize| Rows::new(slices[i].0, slices[i].1);
        let mask = &slices[4].0[slices[4].1.start_offset()..];
        let unit = Unit::new(rows(0)?, rows(1)?, rows(2)?, mask, b, hkv, r, t, s, self.scale);
        let g = rows(3)?;
        let units = b * hkv;
        let classes = classes(units, t);
        let block = s * d;
        let mut dq = vec![0f32; units * r * d];
        // Each work item adds its positions' key/value gradients into a block of its
        // own; with several classes per unit they are summed afterwards in class order.
        let mut dk = vec![0f32; units * classes * block];
        let mut dv = vec![0f32; units * classes * block];
        let (pq, pk, pv) = (SharedOut::new(&mut dq), SharedOut::new(&mut dk), SharedOut::new(&mut dv));
        for_each_unit(units * classes, r * s * d > 1 << 12, |items| {
            let mut sc = Scratch::new();
            for w in items {
                let (u, class) = (w / classes, w % classes);
                // SAFETY: item w writes only its positions' rows of dq and its own dk, dv blocks.
                unsafe {
                    unit.backward(
                        u,
                        (class..t).step_by(classes),
                        g,
                        pq,
                        pk.ptr().add(w * block),
                        pv.ptr().add(w * block),
                        &mut sc,
                    )
                };
            }
        });
        drop(locked);
        let (dk, dv) =
            if classes == 1 { (dk, dv) } else { (sum_classes(&dk, classes, block), sum_classes(&dv, classes, block)) };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, hkv, r, d), dev)?),
            Some(Tensor::from_vec(dk, (b, hkv, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, hkv, s, d), dev)?),
        ))
    }
}

/// Blocks [units, classes, len] summed over the classes, in class order: [units, len].
fn sum_classes(parts: &[f32], classes: usize, len: usize) -> Vec<f32> {
    let mut out = vec![0f32; parts.len() / classes];
    for (o, unit) in out.chunks_exact_mut(len).zip(parts.chunks_exact(classes * len)) {
        for part in unit.chunks_exact(len) {
            for (a, b) in o.iter_mut().zip(part) {
                *a += b;
            }
        }
    }
    out
}

/// The three inner loops of attention, over a run of consecutive key (or
/// value) rows and the heads of one position: AVX2 + FMA register tiles when
/// the CPU has them and the head dimension is a multiple of 8, else plain loops.
mod kernels {
    /// `out[g·ld + i] = x_g · k_i` for the heads `xs` and keys `k_i = k0 + i·ks`, i < n.
    ///
    /// # Safety
    /// Every `xs[g]` and `k_i` points at `d` floats; `out` holds `xs.len()` blocks of
    /// `ld ≥ n` floats.
    pub unsafe fn dots(xs: &[*const f32], k0: *const f32, ks: usize, n: usize, d: usize, out: *mut f32, ld: usize) {
        #[cfg(target_arch = "x86_64")]
        if avx2::usable(d) {
            return avx2::dots(xs, k0, ks, n, d, out, ld);
        }
        for (g, &x) in xs.iter().enumerate() {
            let x = std::slice::from_raw_parts(x, d);
            for i in 0..n {
                *out.add(g * ld + i) = super::dot(x, std::slice::from_raw_parts(k0.add(i * ks), d));
            }
        }
    }

    /// `out_g += Σ_i c[g·ld + i] x_i` for the heads' output rows `out` and the rows
    /// `x_i = x0 + i·xs`, i < n (accumulated in key order).
    ///
    /// # Safety
    /// As [`dots`]; each `out[g]` points at `d` floats nothing else touches meanwhile.
    pub unsafe fn axpys(c: *const f32, ld: usize, x0: *const f32, xs: usize, n: usize, d: usize, out: &[*mut f32]) {
        #[cfg(target_arch = "x86_64")]
        if avx2::usable(d) {
            return avx2::axpys(c, ld, x0, xs, n, d, out);
        }
        for (g, &o) in out.iter().enumerate() {
            let o = std::slice::from_raw_parts_mut(o, d);
            for i in 0..n {
                let (w, x) = (*c.add(g * ld + i), std::slice::from_raw_parts(x0.add(i * xs), d));
                for (oe, xe) in o.iter_mut().zip(x) {
                    *oe += w * xe;
                }
            }
        }
    }

    /// `dst_i += Σ_g c[g·ld + i] x_g` for the rows `dst_i = dst + i·d`, i < n.
    ///
    /// # Safety
    /// As [`dots`]; the n rows of `dst` are this call's alone.
    pub unsafe fn rank_updates(c: *const f32, ld: usize, xs: &[*const f32], n: usize, d: usize, dst: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if avx2::usable(d) {
            return avx2::rank_updates(c, ld, xs, n, d, dst);
        }
        for i in 0..n {
            let row = std::slice::from_raw_parts_mut(dst.add(i * d), d);
            for (g, &x) in xs.iter().enumerate() {
                let (w, x) = (*c.add(g * ld + i), std::slice::from_raw_parts(x, d));
                for (re, xe) in row.iter_mut().zip(x) {
                    *re += w * xe;
                }
            }
        }
    }

    /// Heads in groups of at most 3 (the register tiles below hold 3 heads), as
    /// even as possible: 4 → 2 + 2, 7 → 3 + 2 + 2.
    pub fn head_groups(rep: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let mut g0 = 0;
        std::iter::from_fn(move || {
            let left = rep - g0;
            let take = match left {
                0 => return None,
                4 => 2,
                l => l.min(3),
            };
            g0 += take;
            Some(g0 - take..g0)
        })
    }

    #[cfg(target_arch = "x86_64")]
    // Register tiles index their accumulators by head and vector: loops over indices read best.
    #[allow(clippy::needless_range_loop)]
    mod avx2 {
        use std::arch::x86_64::*;

        pub fn usable(d: usize) -> bool {
            d.is_multiple_of(8) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }

        /// The sums of the 8 lanes of a, b, c, e, each as ((0+1)+(2+3)) + ((4+5)+(6+7)).
        #[inline(always)]
        unsafe fn hsum4(a: __m256, b: __m256, c: __m256, e: __m256) -> [f32; 4] {
            let abce = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
            let mut out = [0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), _mm_add_ps(_mm256_castps256_ps128(abce), _mm256_extractf128_ps(abce, 1)));
            out
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn dots(xs: &[*const f32], k0: *const f32, ks: usize, n: usize, d: usize, out: *mut f32, ld: usize) {
            for gr in super::head_groups(xs.len()) {
                let (x, o) = (&xs[gr.clone()], out.add(gr.start * ld));
                match gr.len() {
                    3 => dots_group::<3, 3>(x, k0, ks, n, d, o, ld),
                    2 => dots_group::<2, 4>(x, k0, ks, n, d, o, ld),
                    _ => dots_group::<1, 8>(x, k0, ks, n, d, o, ld),
                }
            }
        }

        /// HG heads against the keys KG at a time (HG × KG accumulators), then one at a time.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn dots_group<const HG: usize, const KG: usize>(
            xs: &[*const f32],
            k0: *const f32,
            ks: usize,
            n: usize,
            d: usize,
            out: *mut f32,
            ld: usize,
        ) {
            let x: [*const f32; HG] = std::array::from_fn(|g| xs[g]);
            let mut i = 0;
            while i + KG <= n {
                dots_tile::<HG, KG>(&x, k0.add(i * ks), ks, d, out.add(i), ld);
                i += KG;
            }
            while i < n {
                dots_tile::<HG, 1>(&x, k0.add(i * ks), ks, d, out.add(i), ld);
                i += 1;
            }
        }

        #[inline(always)]
        unsafe fn dots_tile<const HG: usize, const KG: usize>(
            x: &[*const f32; HG],
            k: *const f32,
            ks: usize,
            d: usize,
            out: *mut f32,
            ld: usize,
        ) {
            let mut acc = [[_mm256_setzero_ps(); KG]; HG];
            let mut p = 0;
            while p < d {
                let kv: [__m256; KG] = std::array::from_fn(|c| _mm256_loadu_ps(k.add(c * ks + p)));
                for g in 0..HG {
                    let xv = _mm256_loadu_ps(x[g].add(p));
                    for c in 0..KG {
                        acc[g][c] = _mm256_fmadd_ps(xv, kv[c], acc[g][c]);
                    }
                }
                p += 8;
            }
            let z = _mm256_setzero_ps();
            for (g, a) in acc.iter().enumerate() {
                let mut c = 0;
                while c < KG {
                    let at = |i: usize| if c + i < KG { a[c + i] } else { z };
                    let s = hsum4(at(0), at(1), at(2), at(3));
                    for (i, v) in s.iter().enumerate().take(KG - c) {
                        *out.add(g * ld + c + i) = *v;
                    }
                    c += 4;
                }
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn axpys(c: *const f32, ld: usize, x0: *const f32, xs: usize, n: usize, d: usize, out: &[*mut f32]) {
            for gr in super::head_groups(out.len()) {
                let (o, cg) = (&out[gr.clone()], c.add(gr.start * ld));
                match gr.len() {
                    3 => axpys_group::<3, 4>(cg, ld, x0, xs, n, d, o),
                    2 => axpys_group::<2, 6>(cg, ld, x0, xs, n, d, o),
                    _ => axpys_group::<1, 8>(cg, ld, x0, xs, n, d, o),
                }
            }
        }

        /// HG output rows, DC vectors of the head dimension at a time held in registers
        /// across all n keys, then the leftover vectors one at a time.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn axpys_group<const HG: usize, const DC: usize>(
            c: *const f32,
            ld: usize,
            x0: *const f32,
            xs: usize,
            n: usize,
            d: usize,
            out: &[*mut f32],
        ) {
            let o: [*mut f32; HG] = std::array::from_fn(|g| out[g]);
            let mut p = 0;
            while p + DC * 8 <= d {
                axpys_tile::<HG, DC>(c, ld, x0.add(p), xs, n, &o, p);
                p += DC * 8;
            }
            while p < d {
                axpys_tile::<HG, 1>(c, ld, x0.add(p), xs, n, &o, p);
                p += 8;
            }
        }

        #[inline(always)]
        unsafe fn axpys_tile<const HG: usize, const DC: usize>(
            c: *const f32,
            ld: usize,
            x: *const f32,
            xs: usize,
            n: usize,
            o: &[*mut f32; HG],
            p: usize,
        ) {
            let mut acc: [[__m256; DC]; HG] =
                std::array::from_fn(|g| std::array::from_fn(|v| _mm256_loadu_ps(o[g].add(p + v * 8))));
            for i in 0..n {
                let xi = x.add(i * xs);
                let w: [__m256; HG] = std::array::from_fn(|g| _mm256_broadcast_ss(&*c.add(g * ld + i)));
                for v in 0..DC {
                    let xv = _mm256_loadu_ps(xi.add(v * 8));
                    for g in 0..HG {
                        acc[g][v] = _mm256_fmadd_ps(w[g], xv, acc[g][v]);
                    }
                }
            }
            for g in 0..HG {
                for v in 0..DC {
                    _mm256_storeu_ps(o[g].add(p + v * 8), acc[g][v]);
                }
            }
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn rank_updates(c: *const f32, ld: usize, xs: &[*const f32], n: usize, d: usize, dst: *mut f32) {
            for gr in super::head_groups(xs.len()) {
                let (x, cg) = (&xs[gr.clone()], c.add(gr.start * ld));
                match gr.len() {
                    3 => rank_group::<3, 2>(cg, ld, x, n, d, dst),
                    2 => rank_group::<2, 4>(cg, ld, x, n, d, dst),
                    _ => rank_group::<1, 4>(cg, ld, x, n, d, dst),
                }
            }
        }

        /// The HG heads' DC vectors held in registers while every key row is updated.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn rank_group<const HG: usize, const DC: usize>(
            c: *const f32,
            ld: usize,
            xs: &[*const f32],
            n: usize,
            d: usize,
            dst: *mut f32,
        ) {
            let mut p = 0;
            while p + DC * 8 <= d {
                rank_tile::<HG, DC>(c, ld, xs, n, d, dst, p);
                p += DC * 8;
            }
            while p < d {
                rank_tile::<HG, 1>(c, ld, xs, n, d, dst, p);
                p += 8;
            }
        }

        #[inline(always)]
        unsafe fn rank_tile<const HG: usize, const DC: usize>(
            c: *const f32,
            ld: usize,
            xs: &[*const f32],
            n: usize,
            d: usize,
            dst: *mut f32,
            p: usize,
        ) {
            let x: [[__m256; DC]; HG] =
                std::array::from_fn(|g| std::array::from_fn(|v| _mm256_loadu_ps(xs[g].add(p + v * 8))));
            for i in 0..n {
                let row = dst.add(i * d + p);
                let mut acc: [__m256; DC] = std::array::from_fn(|v| _mm256_loadu_ps(row.add(v * 8)));
                for g in 0..HG {
                    let w = _mm256_broadcast_ss(&*c.add(g * ld + i));
                    for v in 0..DC {
                        acc[v] = _mm256_fmadd_ps(w, x[g][v], acc[v]);
                    }
                }
                for v in 0..DC {
                    _mm256_storeu_ps(row.add(v * 8), acc[v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The same function from candle ops.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        let (b, hkv, r, _) = q.dims4().unwrap();
        let (t, s) = (mask.dim(2).unwrap(), k.dim(2).unwrap());
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale)
            .unwrap()
            .reshape((b, hkv, r / t, t, s))
            .unwrap()
            .broadcast_add(&mask.unsqueeze(1).unwrap())
            .unwrap();
        let max = scores.max_keepdim(candle_core::D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap()).unwrap();
        probs.reshape((b, hkv, r, s)).unwrap().matmul(&v.contiguous().unwrap()).unwrap()
    }

    /// A causal mask after `offset` cached keys, with the first two keys of row 1 padding.
    fn mask(b: usize, t: usize, s: usize) -> Tensor {
        let offset = s - t;
        let mut m = Vec::new();
        for row in 0..b {
            for i in 0..t {
                for j in 0..s {
                    let padded = row == 1 && j < 2;
                    m.push(if j <= offset + i && !padded { 0.0f32 } else { -1e9 });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn equals_candle_ops_on_a_cache_view_with_a_causal_padding_mask() {
        let (b, hkv, rep, t, d, cap) = (2, 3, 2, 4, 16, 20);
        let s = 9;
        // Keys and values as a narrow view of a larger cache buffer, as KvCache hands them out.
        let k = rand(&[b, hkv, cap, d], 1).narrow(2, 0, s).unwrap();
        let v = rand(&[b, hkv, cap, d], 2).narrow(2, 0, s).unwrap();
        let q = rand(&[b, hkv, rep * t, d], 3);
        let m = mask(b, t, s);
        let got = attention(&q, &k, &v, &m, 0.25).unwrap();
        assert!(max_diff(&got, &composed(&q, &k, &v, &m, 0.25)) < 1e-5);
    }

    #[test]
    fn gradients_equal_those_of_candle_ops() {
        let (b, hkv, rep, t, d) = (2, 2, 3, 5, 8);
        let q = Var::from_tensor(&rand(&[b, hkv, rep * t, d], 4)).unwrap();
        let k = Var::from_tensor(&rand(&[b, hkv, t, d], 5)).unwrap();
        let v = Var::from_tensor(&rand(&[b, hkv, t, d], 6)).unwrap();
        let m = mask(b, t, t);
        let up = rand(&[b, hkv, rep * t, d], 7);
        let loss = |o: Tensor| (o * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g1 = loss(attention(&q, &k, &v, &m, 0.3).unwrap());
        let g2 = loss(composed(&q, &k, &v, &m, 0.3));
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let d = max_diff(g1.get(x).unwrap(), g2.get(x).unwrap());
            assert!(d < 1e-5, "d{name} differs by {d}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        // Independent of candle's own backward: central differences in f32 on a tiny case.
        let (b, hkv, t, d) = (1, 1, 3, 4);
        let q = rand(&[b, hkv, t, d], 8);
        let k = Var::from_tensor(&rand(&[b, hkv, t, d], 9)).unwrap();
        let v = rand(&[b, hkv, t, d], 10);
        let m = mask(b, t, t);
        let up = rand(&[b, hkv, t, d], 11);
        let f = |k: &Tensor| {
            (attention(&q, k, &v, &m, 0.5).unwrap() * &up).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        };
        let g = (attention(&q, k.as_tensor(), &v, &m, 0.5).unwrap() * &up).unwrap().sum_all().unwrap();
        let grads = g.backward().unwrap();
        let dk: Vec<f32> = grads.get(&k).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let k0: Vec<f32> = k.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        for i in 0..k0.len() {
            let at = |delta: f32| {
                let mut kk = k0.clone();
                kk[i] += delta;
                f(&Tensor::from_vec(kk, (b, hkv, t, d), &Device::Cpu).unwrap())
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((fd - dk[i]).abs() < 2e-3, "dk[{i}]: analytic {} vs finite difference {fd}", dk[i]);
        }
    }

    /// A packed GRPO row: a prompt of `prompt` tokens, then `n` completions of
    /// `len` tokens, each seeing the prompt and itself (causally).
    fn packed(prompt: usize, n: usize, len: usize) -> Tensor {
        let t = prompt + n * len;
        let seg = |i: usize| if i < prompt { None } else { Some((i - prompt) / len) };
        let m: Vec<f32> = (0..t * t)
            .map(|x| {
                let (i, j) = (x / t, x % t);
                if j <= i && (seg(j).is_none() || seg(j) == seg(i)) {
                    0.0
                } else {
                    -1e9
                }
            })
            .collect();
        Tensor::from_vec(m, (1, 1, t, t), &Device::Cpu).unwrap()
    }

    #[test]
    fn packed_rows_and_every_head_grouping_match_candle_ops_forward_and_backward() {
        // rep 1..7 covers every register tile (groups of 3, 2 and 1 heads); d 64 and 16
        // the vector paths with and without leftover vectors, d 12 the plain loops.
        for (rep, d) in [(1, 64), (2, 16), (3, 64), (4, 24), (7, 64), (3, 12)] {
            let m = packed(5, 3, 4);
            let t = m.dim(2).unwrap();
            let q = Var::from_tensor(&rand(&[1, 2, rep * t, d], 20 + rep as u64)).unwrap();
            let k = Var::from_tensor(&rand(&[1, 2, t, d], 21)).unwrap();
            let v = Var::from_tensor(&rand(&[1, 2, t, d], 22)).unwrap();
            let up = rand(&[1, 2, rep * t, d], 23);
            let got = attention(&q, &k, &v, &m, 0.3).unwrap();
            let want = composed(&q, &k, &v, &m, 0.3);
            assert!(max_diff(&got, &want) < 1e-5, "rep {rep} d {d}: forward differs by {}", max_diff(&got, &want));
            let g1 = (got * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &up).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_diff(g1.get(x).unwrap(), g2.get(x).unwrap());
                assert!(diff < 1e-5, "rep {rep} d {d}: d{name} differs by {diff}");
            }
        }
    }

    #[test]
    fn a_sequence_gets_bitwise_the_same_attention_alone_or_in_a_padded_batch() {
        // Sequence 0 alone, then in a batch where it is left-padded by 3 behind a longer one:
        // its visible keys are the same rows in the same order, so its output is the same bits.
        let (hkv, rep, d, t) = (2, 3, 64, 6);
        let q = rand(&[1, hkv, rep * t, d], 30);
        let k = rand(&[1, hkv, t, d], 31);
        let v = rand(&[1, hkv, t, d], 32);
        let alone = attention(&q, &k, &v, &causal(1, t, 0), 0.125).unwrap();
        let pad = 3;
        let tp = t + pad;
        let padded = |x: &Tensor, rows: usize| {
            // [1, hkv, rows·t, d] → [1, hkv, rows·tp, d] with `pad` leading rows per block of t.
            let blocks: Vec<Tensor> = (0..rows)
                .map(|g| {
                    let b = x.narrow(2, g * t, t).unwrap();
                    Tensor::cat(&[&rand(&[1, hkv, pad, d], 40 + g as u64), &b], 2).unwrap()
                })
                .collect();
            Tensor::cat(&blocks, 2).unwrap()
        };
        let other = |seed: u64, rows: usize| rand(&[1, hkv, rows * tp, d], seed);
        let qb = Tensor::cat(&[&other(50, rep), &padded(&q, rep)], 0).unwrap();
        let kb = Tensor::cat(&[&other(51, 1), &padded(&k, 1)], 0).unwrap();
        let vb = Tensor::cat(&[&other(52, 1), &padded(&v, 1)], 0).unwrap();
        let m = Tensor::cat(&[&causal(1, tp, 0), &causal(1, tp, pad)], 0).unwrap();
        let batched = attention(&qb, &kb, &vb, &m, 0.125).unwrap();
        let mine: Vec<Tensor> = (0..rep).map(|g| batched.get(1).unwrap().narrow(1, g * tp + pad, t).unwrap()).collect();
        let mine = Tensor::cat(&mine, 1).unwrap().unsqueeze(0).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            mine.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// A causal mask [b, 1, t, t] whose first `pad` keys are padding.
    fn causal(b: usize, t: usize, pad: usize) -> Tensor {
        let m: Vec<f32> =
            (0..b * t * t).map(|x| if x % t <= (x / t) % t && x % t >= pad { 0.0 } else { -1e9 }).collect();
        Tensor::from_vec(m, (b, 1, t, t), &Device::Cpu).unwrap()
    }
}
