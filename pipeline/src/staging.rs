//! Outputs that appear complete or not at all: written under `NAME.tmp-PID` beside the
//! final name, then renamed into place. Dropped without [`Staged::commit`] (an error,
//! a panic), the temporary is removed and the final name is untouched.

use std::io;
use std::path::{Path, PathBuf};

pub struct Staged {
    /// Where to write: a fresh directory ([`Staged::dir`]) or a file name ([`Staged::file`]).
    pub tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

fn with_suffix(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: the output needs a file or directory name",
                path.display()
            ),
        )
    })?;
    Ok(path.with_file_name(format!(
        "{}.{suffix}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn remove(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        Ok(())
    }
}

impl Staged {
    /// A directory to fill, to become `target`.
    pub fn dir(target: &Path) -> io::Result<Staged> {
        let s = Staged::file(target)?;
        std::fs::create_dir_all(&s.tmp).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", s.tmp.display()))
        })?;
        Ok(s)
    }

    /// A file name to write, to become `target`.
    pub fn file(target: &Path) -> io::Result<Staged> {
        let tmp = with_suffix(target, "tmp")?;
        remove(&tmp)?;
        Ok(Staged {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Renames the temporary into place; an old `target` is removed only after.
    pub fn commit(mut self) -> io::Result<()> {
        let old = with_suffix(&self.target, "old")?;
        if self.target.exists() {
            std::fs::rename(&self.target, &old)?;
        }
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        remove(&old)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = remove(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appears_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old.txt"), "old").unwrap();
        {
            let s = Staged::dir(&out).unwrap();
            std::fs::write(s.tmp.join("half.txt"), "x").unwrap();
            // dropped: a failure half way
        }
        assert!(out.join("old.txt").exists(), "the old output is untouched");
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        let s = Staged::dir(&out).unwrap();
        std::fs::write(s.tmp.join("new.txt"), "new").unwrap();
        s.commit().unwrap();
        assert!(out.join("new.txt").exists() && !out.join("old.txt").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

        let f = d.path().join("f.arrow");
        let s = Staged::file(&f).unwrap();
        std::fs::write(&s.tmp, "data").unwrap();
        assert!(!f.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "data");
    }
}
