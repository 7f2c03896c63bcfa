//! Batches of token sequences as the model takes them: left- or right-padded
//! rows with per-sequence positions, or several sequences packed per row.

use candle_core::{Device, Result, Tensor};

/// The segment of a shared prefix ([`Batch::shared_prefix`]): every segment of
/// its row attends to it.
pub const SHARED_PREFIX: u32 = u32::MAX - 1;

/// A left-padded batch of token sequences, as tensors.
pub struct Batch {
    /// [B, T] u32
    pub ids: Tensor,
    /// [B, T] u32: position of each token within its own sequence (0 for padding).
    pub positions: Tensor,
    /// [B, T] validity (1 = token, 0 = padding), as host data for mask building.
    pub valid: Vec<Vec<bool>>,
    /// Number of padding tokens at the left of each row.
    pub pad_left: Vec<usize>,
    /// Packed rows: tokens attend only within their own segment. `None`: one segment per row.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl Batch {
    /// Rows of equal length with their validity (padding anywhere); positions
    /// count the valid tokens before each one.
    pub fn from_rows(ids: Vec<Vec<u32>>, valid: Vec<Vec<bool>>, device: &Device) -> Result<Batch> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        let mut pos = Vec::with_capacity(b * t);
        for v in &valid {
            let mut n = 0u32;
            for &ok in v {
                pos.push(if ok { n } else { 0 });
                n += ok as u32;
            }
        }
        let pad_left = valid.iter().map(|v| v.iter().take_while(|x| !**x).count()).collect();
        Ok(Batch {
            ids: Tensor::from_vec(ids.concat(), (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            valid,
            pad_left,
            segments: None,
        })
    }

    /// Several sequences packed per row (right-padded to a common length): each
    /// restarts its positions and attends only to itself.
    pub fn packed(rows: &[Vec<Vec<u32>>], pad_id: u32, device: &Device) -> Result<Batch> {
        let pieces = rows
            .iter()
            .map(|r| {
                r.iter().enumerate().map(|(k, s)| Piece { ids: s, segment: k as u32, first_position: 0 }).collect()
            })
            .collect();
        Batch::from_pieces(pieces, pad_id, device)
    }

    /// Rows of one prefix followed by several continuations (right-padded to a
    /// common length): each continuation attends to the prefix and to itself,
    /// its positions continue the prefix's, so every continuation sees exactly
    /// what it would see alone after the prefix, while the prefix is computed
    /// once (GRPO: a prompt and its group's completions).
    pub fn shared_prefix(rows: &[(Vec<u32>, Vec<Vec<u32>>)], pad_id: u32, device: &Device) -> Result<Batch> {
        let pieces = rows
            .iter()
            .map(|(prefix, continuations)| {
                let after = prefix.len() as u32;
                std::iter::once(Piece { ids: prefix, segment: SHARED_PREFIX, first_position: 0 })
                    .chain(continuations.iter().enumerate().map(|(k, c)| Piece {
                        ids: c,
                        segment: k as u32,
                        first_position: after,
                    }))
                    .collect()
            })
            .collect();
        Batch::from_pieces(pieces, pad_id, device)
    }

    /// Rows made of pieces laid end to end, right-padded to a common length.
    fn from_pieces(rows: Vec<Vec<Piece>>, pad_id: u32, device: &Device) -> Result<Batch> {
        let t = rows.iter().map(|r| r.iter().map(|p| p.ids.len()).sum::<usize>()).max().unwrap_or(0);
        let (mut ids, mut pos, mut valid, mut segments) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for r in &rows {
            let (mut v, mut seg) = (Vec::with_capacity(t), Vec::with_capacity(t));
            for p in r {
                let n = p.ids.len();
                ids.extend(p.ids);
                pos.extend(p.first_position..p.first_position + n as u32);
                v.extend(std::iter::repeat_n(true, n));
                seg.extend(std::iter::repeat_n(p.segment, n));
            }
            let pad = t - v.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            pos.extend(std::iter::repeat_n(0u32, pad));
            v.extend(std::iter::repeat_n(false, pad));
            seg.extend(std::iter::repeat_n(u32::MAX, pad));
            valid.push(v);
            segments.push(seg);
        }
        let b = rows.len();
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            pad_left: vec![0; b],
            valid,
            segments: Some(segments),
        })
    }

    pub fn left_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Batch> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let b = seqs.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut pos = Vec::with_capacity(b * t);
        let mut valid = Vec::with_capacity(b);
        let mut pad_left = Vec::with_capacity(b);
        for s in seqs {
            let pad = t - s.len();
            pad_left.push(pad);
            ids.extend(std::iter::repeat_n(pad_id, pad).chain(s.iter().copied()));
            pos.extend(std::iter::repeat_n(0u32, pad).chain(0..s.len() as u32));
            valid.push((0..t).map(|i| i >= pad).collect());
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), device)?,
            positions: Tensor::from_vec(pos, (b, t), device)?,
            valid,
            pad_left,
            segments: None,
        })
    }
}

/// A run of tokens in a packed row: its segment (who may attend to it) and the
/// position of its first token.
struct Piece<'a> {
    ids: &'a [u32],
    segment: u32,
    first_position: u32,
}
