//! The on-disk form of any stream: Arrow IPC files of bounded size (`shard-00000.arrow`,
//! …) plus `manifest.json` (schema and metadata; per shard its first position, batches,
//! rows, bytes and xxHash3 checksum). Every shard and every manifest update is written
//! under a temporary name and renamed, so the directory always holds a readable prefix
//! of the stream; a writer that was killed continues after its last complete shard.

use crate::stream::{file_err, BatchSink, BatchSource, StreamError};
use arrow_array::RecordBatch;
use arrow_schema::{Schema, SchemaRef};
use base64::Engine;
use schemas::streams::{
    FieldDesc, Manifest, ShardEntry, MANIFEST_FILE, MANIFEST_FORMAT, SHARD_EXT, SHARD_PREFIX,
};
use std::fs::File;
use std::hash::Hasher;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default shard size: a shard is closed once it holds this many bytes.
pub const DEFAULT_SHARD_BYTES: u64 = 256 << 20;

/// True when `dir` holds a manifest of ours. A `manifest.json` of another kind (no
/// `format` of ours) is left alone: the directory is then read as plain files.
pub fn is_shard_dir(dir: &Path) -> Result<bool, StreamError> {
    let path = dir.join(MANIFEST_FILE);
    if !dir.is_dir() || !path.is_file() {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| file_err(&path, format!("not valid JSON: {e}")))?;
    Ok(v.get("format")
        .and_then(|f| f.as_str())
        .is_some_and(|f| f.starts_with("saestream.shards/")))
}

/// Reads and checks `DIR/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, StreamError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| file_err(&path, format!("not a valid shard manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        return Err(file_err(
            &path,
            format!(
                "manifest format '{}', this version reads '{MANIFEST_FORMAT}'",
                m.format
            ),
        ));
    }
    let mut next = 0;
    for s in &m.shards {
        if s.first_position != next {
            return Err(file_err(
                &path,
                format!(
                    "shard {} starts at position {}, the shards before it end at {next}",
                    s.file, s.first_position
                ),
            ));
        }
        if s.file.contains(['/', '\\']) || s.file.starts_with('.') {
            return Err(file_err(
                &path,
                format!("shard name '{}' is not a plain file name", s.file),
            ));
        }
        next += s.batches;
    }
    if next != m.batches {
        return Err(file_err(
            &path,
            format!("{} batches listed, but the shards hold {next}", m.batches),
        ));
    }
    Ok(m)
}

/// The manifest's schema (exact, from its IPC form).
pub fn manifest_schema(dir: &Path, m: &Manifest) -> Result<SchemaRef, StreamError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&m.schema_ipc)
        .map_err(|e| file_err(&path, format!("schema_ipc is not base64: {e}")))?;
    let schema = arrow_ipc::convert::try_schema_from_flatbuffer_bytes(&bytes)
        .map_err(|e| file_err(&path, format!("schema_ipc is not an Arrow schema: {e}")))?;
    Ok(Arc::new(schema))
}

fn schema_ipc(schema: &Schema) -> String {
    let data = arrow_ipc::writer::IpcDataGenerator::default()
        .schema_to_bytes_with_dictionary_tracker(
            schema,
            &mut arrow_ipc::writer::DictionaryTracker::new(false),
            &arrow_ipc::writer::IpcWriteOptions::default(),
        );
    base64::engine::general_purpose::STANDARD.encode(data.ipc_message)
}

/// The schema as the manifest shows it.
pub fn describe_fields(schema: &Schema) -> Vec<FieldDesc> {
    schema
        .fields()
        .iter()
        .map(|f| FieldDesc {
            name: f.name().clone(),
            data_type: f.data_type().to_string(),
            nullable: f.is_nullable(),
        })
        .collect()
}

fn shard_name(index: usize) -> String {
    format!("{SHARD_PREFIX}{index:05}.{SHARD_EXT}")
}

fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}.tmp-{}", std::process::id()))
}

fn is_tmp(name: &str) -> bool {
    name.contains(".tmp-")
}

/// Writes `bytes` to `path` through a temporary name, fsynced, then renamed.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StreamError> {
    atomic_write_mode(path, bytes, 0o644)
}

/// [`atomic_write`] with the file's mode (0o600 for secrets: no moment readable by others).
pub fn atomic_write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StreamError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_name(path);
    let res = (|| -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(path, e));
    }
    Ok(())
}

/// Cuts a shard directory back to at most `position` batches, at a shard boundary (the
/// shards past it are deleted, the manifest rewritten first); returns where the stream
/// now ends, the position a resumed writer continues at. For a stage resumed at an
/// earlier position than its cache reached.
pub fn truncate(dir: &Path, position: u64) -> Result<u64, StreamError> {
    let mut m = read_manifest(dir)?;
    let keep = m
        .shards
        .iter()
        .take_while(|s| s.first_position + s.batches <= position)
        .count();
    let dropped: Vec<ShardEntry> = m.shards.split_off(keep);
    if dropped.is_empty() {
        return Ok(m.batches);
    }
    m.batches = m.shards.iter().map(|s| s.batches).sum();
    m.rows = m.shards.iter().map(|s| s.rows).sum();
    m.bytes = m.shards.iter().map(|s| s.bytes).sum();
    m.complete = false;
    // The manifest no longer lists them before they go: a crash in between leaves
    // unlisted files, never a listed file that is missing.
    let json = serde_json::to_vec_pretty(&m).expect("manifest serialises");
    atomic_write(&dir.join(MANIFEST_FILE), &json)?;
    for s in dropped {
        let f = dir.join(&s.file);
        std::fs::remove_file(&f).map_err(|e| file_err(&f, e))?;
    }
    Ok(m.batches)
}

/// How an existing output directory is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse a directory that holds anything.
    Refuse,
    /// Continue a stream after its last complete shard.
    Resume,
    /// Write a new stream beside it and swap it in at the end.
    Overwrite,
}

#[derive(Clone, Debug)]
pub struct ShardOptions {
    /// A shard is closed once it holds at least this many bytes.
    pub shard_bytes: u64,
    pub existing: Existing,
    /// Test hook: writes fail with "no space left" once this many bytes are written.
    #[doc(hidden)]
    pub fail_after_bytes: Option<u64>,
}

impl Default for ShardOptions {
    fn default() -> Self {
        ShardOptions {
            shard_bytes: DEFAULT_SHARD_BYTES,
            existing: Existing::Refuse,
            fail_after_bytes: None,
        }
    }
}

/// A file being written: counts and hashes what passes, and can fail on purpose.
struct Tee {
    file: io::BufWriter<File>,
    hash: twox_hash::XxHash3_64,
    bytes: u64,
    budget: Option<u64>,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(b) = &mut self.budget {
            if (buf.len() as u64) > *b {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (injected)",
                ));
            }
            *b -= buf.len() as u64;
        }
        let n = self.file.write(buf)?;
        self.hash.write(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

struct OpenShard {
    tmp: PathBuf,
    name: String,
    writer: arrow_ipc::writer::FileWriter<Tee>,
    first_position: u64,
    batches: u64,
    rows: u64,
}

/// Writes a stream as shards. Dropped without [`BatchSink::finish`], the shard being
/// written is removed and the manifest lists the complete ones (`complete: false`).
pub struct ShardWriter {
    /// Where the files go (a staging directory when overwriting).
    dir: PathBuf,
    /// The directory asked for.
    target: PathBuf,
    staged: Option<crate::staging::Staged>,
    schema: SchemaRef,
    manifest: Manifest,
    opts: ShardOptions,
    current: Option<OpenShard>,
    /// Bytes the injected failure still allows.
    budget: Option<u64>,
}

impl ShardWriter {
    /// Opens `dir` for the stream `schema`. With [`Existing::Resume`] on a directory that
    /// holds shards, writing continues at [`ShardWriter::position`] (the source must be
    /// opened there) and the schema must match.
    pub fn create(
        dir: &Path,
        schema: SchemaRef,
        opts: ShardOptions,
    ) -> Result<ShardWriter, StreamError> {
        let has_ours = is_shard_dir(dir)?;
        let non_empty = dir.is_dir()
            && std::fs::read_dir(dir)
                .map_err(|e| file_err(dir, e))?
                .next()
                .is_some();
        if dir.exists() && !dir.is_dir() {
            return Err(file_err(dir, "exists and is not a directory"));
        }
        let fresh = || Manifest {
            format: MANIFEST_FORMAT.into(),
            schema_ipc: schema_ipc(&schema),
            fields: describe_fields(&schema),
            metadata: schema.metadata().clone().into_iter().collect(),
            complete: false,
            batches: 0,
            rows: 0,
            bytes: 0,
            shards: vec![],
        };
        let (manifest, write_dir, staged) = match (opts.existing, non_empty) {
            (Existing::Resume, _) if has_ours => {
                let mut manifest = read_manifest(dir)?;
                let have = manifest_schema(dir, &manifest)?;
                if have.as_ref() != schema.as_ref() {
                    return Err(file_err(
                        &dir.join(MANIFEST_FILE),
                        format!(
                            "cannot resume: the shards hold schema {:?} (metadata {:?}), the stream has {:?} (metadata {:?})",
                            describe_fields(&have), have.metadata(), describe_fields(&schema), schema.metadata()
                        ),
                    ));
                }
                // What a killed writer left half done.
                for e in std::fs::read_dir(dir).map_err(|e| file_err(dir, e))? {
                    let e = e.map_err(|e| file_err(dir, e))?;
                    if is_tmp(&e.file_name().to_string_lossy()) {
                        std::fs::remove_file(e.path()).map_err(|er| file_err(&e.path(), er))?;
                    }
                }
                manifest.complete = false;
                (manifest, dir.to_path_buf(), None)
            }
            (Existing::Resume, true) => {
                return Err(file_err(
                    dir,
                    "cannot resume: no shard manifest here (and the directory is not empty)",
                ))
            }
            (Existing::Refuse, true) => {
                return Err(file_err(
                    dir,
                    if has_ours {
                        "already holds a stream: --resume continues it, --overwrite replaces it"
                    } else {
                        "exists and is not empty: --overwrite replaces it"
                    },
                ))
            }
            (Existing::Overwrite, true) => {
                let s = crate::staging::Staged::dir(dir).map_err(|e| file_err(dir, e))?;
                (fresh(), s.tmp.clone(), Some(s))
            }
            (_, false) => {
                std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
                (fresh(), dir.to_path_buf(), None)
            }
        };
        let mut w = ShardWriter {
            dir: write_dir,
            target: dir.to_path_buf(),
            staged,
            schema,
            manifest,
            budget: opts.fail_after_bytes,
            opts,
            current: None,
        };
        w.write_manifest()?;
        Ok(w)
    }

    /// The position the next batch written will have.
    pub fn position(&self) -> u64 {
        self.manifest.batches + self.current.as_ref().map_or(0, |c| c.batches)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn write_manifest(&mut self) -> Result<(), StreamError> {
        let json = serde_json::to_vec_pretty(&self.manifest).expect("manifest serialises");
        atomic_write(&self.dir.join(MANIFEST_FILE), &json)
    }

    fn open_shard(&mut self) -> Result<(), StreamError> {
        let name = shard_name(self.manifest.shards.len());
        let path = self.dir.join(&name);
        let tmp = tmp_name(&path);
        let file = File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
        let tee = Tee {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hash: twox_hash::XxHash3_64::new(),
            bytes: 0,
            budget: self.budget,
        };
        let writer = arrow_ipc::writer::FileWriter::try_new(tee, &self.schema)
            .map_err(|e| self.fail(&tmp, e))?;
        self.current = Some(OpenShard {
            tmp,
            name,
            writer,
            first_position: self.manifest.batches,
            batches: 0,
            rows: 0,
        });
        Ok(())
    }

    /// Removes the temporary shard and gives the error, naming the file.
    fn fail(&mut self, tmp: &Path, e: impl std::fmt::Display) -> StreamError {
        let _ = std::fs::remove_file(tmp);
        self.current = None;
        file_err(tmp, format!("cannot write shard: {e}"))
    }

    fn close_shard(&mut self) -> Result<(), StreamError> {
        let Some(mut s) = self.current.take() else {
            return Ok(());
        };
        let tmp = s.tmp.clone();
        if let Err(e) = s.writer.finish() {
            return Err(self.fail(&tmp, e));
        }
        let tee = match s.writer.into_inner() {
            Ok(t) => t,
            Err(e) => return Err(self.fail(&tmp, e)),
        };
        self.budget = tee.budget;
        let (bytes, hash) = (tee.bytes, tee.hash.finish());
        let res = tee
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all());
        if let Err(e) = res {
            return Err(self.fail(&tmp, e));
        }
        let path = self.dir.join(&s.name);
        if let Err(e) = std::fs::rename(&tmp, &path) {
            return Err(self.fail(&tmp, e));
        }
        self.manifest.shards.push(ShardEntry {
            file: s.name,
            first_position: s.first_position,
            batches: s.batches,
            rows: s.rows,
            bytes,
            xxh3: format!("{hash:016x}"),
        });
        self.manifest.batches += s.batches;
        self.manifest.rows += s.rows;
        self.manifest.bytes += bytes;
        self.write_manifest()
    }
}

impl BatchSink for ShardWriter {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), StreamError> {
        if batch.schema().as_ref() != self.schema.as_ref() {
            return Err(file_err(
                &self.target,
                format!(
                    "a batch at position {} has schema {:?}, the stream {:?}",
                    self.position(),
                    describe_fields(&batch.schema()),
                    describe_fields(&self.schema)
                ),
            ));
        }
        if self.current.is_none() {
            self.open_shard()?;
        }
        let s = self.current.as_mut().expect("opened above");
        if let Err(e) = s.writer.write(batch) {
            let tmp = s.tmp.clone();
            return Err(self.fail(&tmp, e));
        }
        s.batches += 1;
        s.rows += batch.num_rows() as u64;
        if s.writer.get_ref().bytes >= self.opts.shard_bytes {
            self.close_shard()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StreamError> {
        self.close_shard()?;
        self.manifest.complete = true;
        self.write_manifest()?;
        if let Some(s) = self.staged.take() {
            s.commit().map_err(|e| file_err(&self.target, e))?;
            self.dir = self.target.clone();
        }
        Ok(())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some(s) = self.current.take() {
            let _ = std::fs::remove_file(&s.tmp);
        }
    }
}

/// Reads a shard directory from any position, checking each shard against the manifest
/// (size, checksum, schema, batch and row counts) before using it.
pub struct ShardReader {
    dir: PathBuf,
    manifest: Manifest,
    schema: SchemaRef,
    shard: usize,
    batches: std::vec::IntoIter<RecordBatch>,
    position: u64,
}

impl ShardReader {
    pub fn open(dir: &Path, position: u64) -> Result<ShardReader, StreamError> {
        let manifest = read_manifest(dir)?;
        let schema = manifest_schema(dir, &manifest)?;
        if position > manifest.batches {
            return Err(file_err(
                dir,
                format!(
                    "cannot start at position {position}: the shards hold {} batches",
                    manifest.batches
                ),
            ));
        }
        let shard = manifest
            .shards
            .iter()
            .position(|s| position < s.first_position + s.batches)
            .unwrap_or(manifest.shards.len());
        let mut r = ShardReader {
            dir: dir.to_path_buf(),
            schema,
            shard,
            batches: Vec::new().into_iter(),
            position,
            manifest,
        };
        if r.shard < r.manifest.shards.len() {
            let first = r.manifest.shards[r.shard].first_position;
            let mut all = r.load(r.shard)?;
            all.drain(..(position - first) as usize);
            r.batches = all.into_iter();
            r.shard += 1;
        }
        Ok(r)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Reads shard `i` whole and checks it against its manifest entry.
    pub fn load(&self, i: usize) -> Result<Vec<RecordBatch>, StreamError> {
        let e = &self.manifest.shards[i];
        let path = self.dir.join(&e.file);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(file_err(
                    &path,
                    format!("listed in {MANIFEST_FILE} but missing"),
                ))
            }
            Err(err) => return Err(file_err(&path, err)),
        };
        if bytes.len() as u64 != e.bytes {
            return Err(file_err(
                &path,
                format!("{} bytes, {MANIFEST_FILE} says {}", bytes.len(), e.bytes),
            ));
        }
        let hash = format!("{:016x}", twox_hash::XxHash3_64::oneshot(&bytes));
        if hash != e.xxh3 {
            return Err(file_err(
                &path,
                format!(
                    "checksum mismatch: xxh3 {hash}, {MANIFEST_FILE} says {} (the file is corrupt)",
                    e.xxh3
                ),
            ));
        }
        let reader = arrow_ipc::reader::FileReader::try_new(io::Cursor::new(bytes), None)
            .map_err(|err| file_err(&path, format!("not a readable Arrow IPC file: {err}")))?;
        if reader.schema().as_ref() != self.schema.as_ref() {
            return Err(file_err(
                &path,
                format!(
                    "its schema {:?} differs from {MANIFEST_FILE}'s {:?}",
                    describe_fields(&reader.schema()),
                    self.manifest.fields
                ),
            ));
        }
        let batches: Vec<RecordBatch> = reader
            .collect::<Result<_, _>>()
            .map_err(|err| file_err(&path, err))?;
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        if batches.len() as u64 != e.batches || rows != e.rows {
            return Err(file_err(
                &path,
                format!(
                    "holds {} batches and {rows} rows, {MANIFEST_FILE} says {} and {}",
                    batches.len(),
                    e.batches,
                    e.rows
                ),
            ));
        }
        Ok(batches)
    }
}

impl BatchSource for ShardReader {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn position(&self) -> u64 {
        self.position
    }
    fn next_batch(&mut self) -> Result<Option<RecordBatch>, StreamError> {
        loop {
            if let Some(b) = self.batches.next() {
                self.position += 1;
                return Ok(Some(b));
            }
            if self.shard >= self.manifest.shards.len() {
                return Ok(None);
            }
            self.batches = self.load(self.shard)?.into_iter();
            self.shard += 1;
        }
    }
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::Synthetic;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn all(mut s: impl BatchSource) -> Vec<RecordBatch> {
        let mut v = vec![];
        while let Some(b) = s.next_batch().unwrap() {
            v.push(b);
        }
        v
    }

    #[test]
    fn a_failed_write_leaves_no_file_under_a_final_name() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("cache");
        let mut src = Synthetic::open("activations?batches=12&rows=64&d=32", 0).unwrap();
        let mut w = ShardWriter::create(
            &out,
            src.schema(),
            ShardOptions {
                shard_bytes: 20_000,
                fail_after_bytes: Some(70_000),
                ..Default::default()
            },
        )
        .unwrap();
        let mut err = None;
        while let Some(b) = src.next_batch().unwrap() {
            if let Err(e) = w.write(&b) {
                err = Some(e.to_string());
                break;
            }
        }
        let err = err.expect("the write budget runs out");
        assert!(
            err.contains("no space left") && err.contains(".tmp-"),
            "{err}"
        );
        drop(w);
        // every file left is complete and listed; nothing temporary
        let m = read_manifest(&out).unwrap();
        assert!(!m.complete && !m.shards.is_empty());
        let mut want: Vec<String> = m.shards.iter().map(|s| s.file.clone()).collect();
        want.push(MANIFEST_FILE.into());
        want.sort();
        assert_eq!(names(&out), want);
        let back = all(ShardReader::open(&out, 0).unwrap());
        let first = all(Synthetic::open("activations?batches=12&rows=64&d=32", 0).unwrap());
        assert_eq!(back, first[..back.len()]);
    }

    #[test]
    fn reads_from_any_position_and_resumes_writing() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("c");
        let spec = "tokens?batches=9&rows=5&context=7";
        let want = all(Synthetic::open(spec, 0).unwrap());
        let opts = ShardOptions {
            shard_bytes: 1500,
            ..Default::default()
        };
        let mut w = ShardWriter::create(&out, want[0].schema(), opts.clone()).unwrap();
        for b in &want[..5] {
            w.write(b).unwrap();
        }
        drop(w); // interrupted: the open shard is dropped
        let e = ShardWriter::create(&out, want[0].schema(), opts.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--resume"), "{e}");
        let mut w = ShardWriter::create(
            &out,
            want[0].schema(),
            ShardOptions {
                existing: Existing::Resume,
                ..opts
            },
        )
        .unwrap();
        let p = w.position() as usize;
        assert!(p < 5);
        for b in &want[p..] {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        assert!(read_manifest(&out).unwrap().complete);
        for start in [0, 3, 8, 9] {
            assert_eq!(
                all(ShardReader::open(&out, start as u64).unwrap()),
                want[start..],
                "from {start}"
            );
        }
        let e = ShardReader::open(&out, 10).err().unwrap().to_string();
        assert!(e.contains("hold 9 batches"), "{e}");
    }

    #[test]
    fn truncating_keeps_whole_shards_up_to_the_position_and_resumes_there() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("c");
        let spec = "tokens?batches=9&rows=5&context=7";
        let want = all(Synthetic::open(spec, 0).unwrap());
        let opts = ShardOptions {
            shard_bytes: 1500,
            ..Default::default()
        };
        let mut w = ShardWriter::create(&out, want[0].schema(), opts.clone()).unwrap();
        for b in &want {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        let m = read_manifest(&out).unwrap();
        assert!(m.shards.len() >= 3, "{m:?}");
        let ends: Vec<u64> = m
            .shards
            .iter()
            .map(|s| s.first_position + s.batches)
            .collect();
        // past the end: nothing changes
        assert_eq!(truncate(&out, 20).unwrap(), 9);
        assert!(read_manifest(&out).unwrap().complete);
        // inside the second shard: cut back to the end of the first
        let at = ends[0] + 1;
        assert_eq!(truncate(&out, at).unwrap(), ends[0]);
        let m = read_manifest(&out).unwrap();
        assert!(!m.complete && m.shards.len() == 1 && m.batches == ends[0]);
        let mut files = vec![m.shards[0].file.clone(), MANIFEST_FILE.to_string()];
        files.sort();
        assert_eq!(names(&out), files);
        // a resumed writer continues there and the stream is whole again
        let mut w = ShardWriter::create(
            &out,
            want[0].schema(),
            ShardOptions {
                existing: Existing::Resume,
                ..opts
            },
        )
        .unwrap();
        assert_eq!(w.position(), ends[0]);
        for b in &want[ends[0] as usize..] {
            w.write(b).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(all(ShardReader::open(&out, 0).unwrap()), want);
    }
}
