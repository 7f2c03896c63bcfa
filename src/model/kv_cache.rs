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
}
