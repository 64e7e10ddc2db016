//! SAELens's `seqpos_slice`: which token positions of each sequence become activation rows.

use crate::CfgError;

/// An error reported as its message alone (it names the flag itself).
fn bad(message: String) -> CfgError {
    CfgError::new("<seqpos_slice>", message)
}

/// Python slice semantics (`slice(start, stop, step)`, negative indices from the end)
/// over `0..len`, positive steps only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqposSlice {
    pub start: Option<i64>,
    pub stop: Option<i64>,
    pub step: Option<i64>,
}

impl SeqposSlice {
    /// Parses `START:STOP[:STEP]`, each part optional (`1:`, `:-1`, `::2`).
    pub fn parse(s: &str) -> Result<SeqposSlice, CfgError> {
        let parts: Vec<&str> = s.split(':').collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(bad(format!(
                "--seqpos-slice '{s}': expected START:STOP or START:STOP:STEP (parts may be empty)"
            )));
        }
        let num = |p: &str, what: &str| -> Result<Option<i64>, CfgError> {
            let p = p.trim();
            if p.is_empty() {
                return Ok(None);
            }
            p.parse().map(Some).map_err(|_| {
                bad(format!(
                    "--seqpos-slice '{s}': {what} '{p}' is not an integer"
                ))
            })
        };
        let out = SeqposSlice {
            start: num(parts[0], "START")?,
            stop: num(parts[1], "STOP")?,
            step: match parts.get(2) {
                Some(p) => num(p, "STEP")?,
                None => None,
            },
        };
        if out.step.is_some_and(|st| st <= 0) {
            return Err(bad(format!("--seqpos-slice '{s}': STEP must be positive")));
        }
        Ok(out)
    }

    /// The positions selected out of `0..len`.
    pub fn positions(&self, len: usize) -> Vec<usize> {
        let n = len as i64;
        let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
        let start = self.start.map_or(0, clamp);
        let stop = self.stop.map_or(n, clamp);
        let step = self.step.unwrap_or(1);
        (start..stop)
            .step_by(step as usize)
            .map(|p| p as usize)
            .collect()
    }

    /// The slice as SAELens writes it in a config: `[start, stop, step]`, in its
    /// shortest form (`[None]` for the whole sequence).
    pub fn to_list(&self) -> Vec<Option<i64>> {
        match (self.start, self.step) {
            (None, None) => vec![self.stop],
            (_, None) => vec![self.start, self.stop],
            _ => vec![self.start, self.stop, self.step],
        }
    }

    /// From SAELens's tuple form: `[stop]`, `[start, stop]` or `[start, stop, step]`,
    /// as Python's `slice(*seqpos_slice)` reads them.
    pub fn from_list(v: &[Option<i64>]) -> Result<SeqposSlice, CfgError> {
        let out = match v {
            [stop] => SeqposSlice {
                start: None,
                stop: *stop,
                step: None,
            },
            [start, stop] => SeqposSlice {
                start: *start,
                stop: *stop,
                step: None,
            },
            [start, stop, step] => SeqposSlice {
                start: *start,
                stop: *stop,
                step: *step,
            },
            _ => {
                return Err(CfgError::new(
                    "seqpos_slice",
                    format!("expected 1 to 3 values (a Python slice), got {}", v.len()),
                ))
            }
        };
        if out.step.is_some_and(|s| s <= 0) {
            return Err(CfgError::new("seqpos_slice", "the step must be positive"));
        }
        Ok(out)
    }

    /// `START:STOP:STEP`, as `--seqpos-slice` takes it.
    pub fn to_arg(&self) -> String {
        let f = |v: Option<i64>| v.map_or(String::new(), |x| x.to_string());
        format!("{}:{}:{}", f(self.start), f(self.stop), f(self.step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqpos_slice_follows_python() {
        let p = |s: &str, n| SeqposSlice::parse(s).unwrap().positions(n);
        assert_eq!(p("1:", 5), vec![1, 2, 3, 4]);
        assert_eq!(p(":-1", 5), vec![0, 1, 2, 3]);
        assert_eq!(p("::2", 5), vec![0, 2, 4]);
        assert_eq!(p("-3:10:2", 5), vec![2, 4]);
        assert_eq!(p("4:2", 5), Vec::<usize>::new());
        assert_eq!(p(":", 3), vec![0, 1, 2]);
        assert!(SeqposSlice::parse("1").is_err());
        assert!(SeqposSlice::parse("a:2")
            .unwrap_err()
            .to_string()
            .contains("START 'a'"));
        assert!(SeqposSlice::parse("::0")
            .unwrap_err()
            .to_string()
            .contains("positive"));
    }

    #[test]
    fn list_form_round_trips() {
        let s = SeqposSlice::from_list(&[Some(1), None]).unwrap();
        assert_eq!(s.positions(4), vec![1, 2, 3]);
        assert_eq!(s.to_list(), vec![Some(1), None]);
        assert_eq!(SeqposSlice::default().to_list(), vec![None]);
        assert_eq!(
            SeqposSlice::from_list(&[Some(2)]).unwrap().positions(5),
            vec![0, 1]
        );
        assert_eq!(SeqposSlice::parse(&s.to_arg()).unwrap(), s);
        assert!(SeqposSlice::from_list(&[]).is_err());
    }
}
