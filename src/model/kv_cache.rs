//! Keys and values of every layer so far, preallocated to a capacity so each
//! decode step writes in place instead of copying the whole cache.

use candle_core::{Device, Result, Tensor};

pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    pub len: usize,
    capacity: usize,
    /// Validity of every cached key position, per row.
    pub valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(num_layers: usize, capacity: usize) -> KvCache {
        KvCache { layers: vec![None; num_layers], len: 0, capacity, valid: Vec::new() }
    }

    /// Write this step's keys and values of `layer` after what the cache holds;
    /// returns views of everything cached for that layer so far.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, t, d) = k.dims4()?;
        if self.len + t > self.capacity {
            candle_core::bail!("KV cache full: {} + {t} > capacity {}", self.len, self.capacity);
        }
        let slot = &mut self.layers[layer];
        if slot.is_none() {
            let kb = Tensor::zeros((b, h, self.capacity, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, self.capacity, d), v.dtype(), v.device())?;
            *slot = Some((kb, vb));
        }
        let (kb, vb) = slot.as_ref().expect("allocated above");
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kb.narrow(2, 0, self.len + t)?, vb.narrow(2, 0, self.len + t)?))
    }

    /// A cache whose row i is row `rows[i]` of this one: a prompt prefilled
    /// once serves every sample of its group.
    pub fn select_rows(&self, rows: &[u32]) -> Result<KvCache> {
        let dev = self.layers.iter().flatten().next().map(|(k, _)| k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::new(rows, &dev)?;
        let layers = self
            .layers
            .iter()
            .map(|l| match l {
                Some((k, v)) => Ok(Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let valid = rows.iter().map(|&r| self.valid[r as usize].clone()).collect();
        Ok(KvCache { layers, len: self.len, capacity: self.capacity, valid })
    }

    /// Put the rows of `group` (a cache prefilled on its own) into slots
    /// `slots` of this one, right-aligned to this cache's length: their
    /// positions before the group's are masked. Needs `group.len ≤ self.len`.
    pub fn place(&mut self, slots: &[usize], group: &KvCache) -> Result<()> {
        let (g, at) = (group.len, self.len.checked_sub(group.len));
        let Some(at) = at else {
            candle_core::bail!("KV cache: a group of {g} positions does not fit before position {}", self.len);
        };
        if slots.len() != group.valid.len() {
            candle_core::bail!("KV cache: {} slots for a group of {} rows", slots.len(), group.valid.len());
        }
        for (mine, theirs) in self.layers.iter().zip(&group.layers) {
            let (Some((kb, vb)), Some((gk, gv))) = (mine, theirs) else { continue };
            for (i, &slot) in slots.iter().enumerate() {
                // A row of the buffer is a contiguous view: slice_set writes into it in place.
                kb.narrow(0, slot, 1)?.slice_set(&gk.narrow(0, i, 1)?.narrow(2, 0, g)?.contiguous()?, 2, at)?;
                vb.narrow(0, slot, 1)?.slice_set(&gv.narrow(0, i, 1)?.narrow(2, 0, g)?.contiguous()?, 2, at)?;
            }
        }
        for (i, &slot) in slots.iter().enumerate() {
            let mut valid = vec![false; at];
            valid.extend(&group.valid[i]);
            self.valid[slot] = valid;
        }
        Ok(())
    }

    /// Drop the first `n` positions of every row (none of them still seen): the
    /// live window moves to the front of newly allocated buffers.
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        if n > self.len {
            candle_core::bail!("KV cache: cannot drop {n} of {} positions", self.len);
        }
        let keep = self.len - n;
        for slot in self.layers.iter_mut() {
            let Some((k, v)) = slot.as_ref() else { continue };
            let moved = |t: &Tensor| -> Result<Tensor> {
                let (b, h, cap, d) = t.dims4()?;
                let fresh = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
                if keep > 0 {
                    fresh.slice_set(&t.narrow(2, n, keep)?.contiguous()?, 2, 0)?;
                }
                Ok(fresh)
            };
            *slot = Some((moved(k)?, moved(v)?));
        }
        for row in self.valid.iter_mut() {
            row.drain(..n.min(row.len()));
        }
        self.len = keep;
        Ok(())
    }
}
