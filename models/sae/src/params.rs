use kernels::{ops, Device, Tensor};

/// Named parameter tensors in a fixed order (SAELens state-dict names). Gradients and
/// optimizer moments use the same type, with the same names and shapes.
#[derive(Clone, Debug)]
pub struct Params {
    entries: Vec<(String, Tensor)>,
}

impl Params {
    pub fn new() -> Params {
        Params {
            entries: Vec::new(),
        }
    }

    /// Zeros with the given names and shapes.
    pub fn zeros(device: &Device, specs: &[(&str, Vec<usize>)]) -> Params {
        Params {
            entries: specs
                .iter()
                .map(|(n, s)| (n.to_string(), Tensor::zeros(device, s)))
                .collect(),
        }
    }

    /// Zeros shaped like `self`.
    pub fn zeros_like(&self) -> Params {
        Params {
            entries: self
                .entries
                .iter()
                .map(|(n, t)| (n.clone(), Tensor::zeros(&t.device(), t.shape())))
                .collect(),
        }
    }

    pub fn insert(&mut self, name: &str, t: Tensor) {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = t,
            None => self.entries.push((name.to_string(), t)),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(i).1)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|(n, _)| n == name)
    }

    /// The tensor called `name`. Panics when absent: parameter sets are fixed by the
    /// architecture, so a missing name is a bug.
    pub fn get(&self, name: &str) -> &Tensor {
        self.try_get(name)
            .unwrap_or_else(|| panic!("no parameter '{name}' (have {:?})", self.names()))
    }

    pub fn try_get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn get_mut(&mut self, name: &str) -> &mut Tensor {
        let names = self.names().join(", ");
        self.entries
            .iter_mut()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("no parameter '{name}' (have {names})"))
    }

    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.entries.iter_mut().map(|(n, t)| (n.as_str(), t))
    }

    /// Sets every tensor to zero (keeps the allocations).
    pub fn zero(&mut self) {
        for (_, t) in self.entries.iter_mut() {
            ops::fill(t, 0.0);
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self::new()
    }
}
