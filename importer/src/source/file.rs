//! A local file as a source (`file://` URLs and plain paths in `cdi import`).

use std::path::PathBuf;

use tokio::io::AsyncSeekExt;
use tokio_util::io::ReaderStream;

use super::{BoxFuture, ByteSource, Opened};
use crate::error::{ImportError, Result};

/// Chunk size of file reads.
const FILE_CHUNK: usize = 256 * 1024;

/// A local file.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
}

impl FileSource {
    /// A source reading `path`.
    pub fn new(path: PathBuf) -> FileSource {
        FileSource { path }
    }
}

impl ByteSource for FileSource {
    fn open(&self, offset: u64, _validator: Option<String>) -> BoxFuture<'_, Result<Opened>> {
        Box::pin(async move {
            let mut file = tokio::fs::File::open(&self.path).await.map_err(|e| {
                ImportError::connect(format!("opening {}: {e}", self.path.display()))
            })?;
            let total = file.metadata().await.ok().map(|m| m.len());
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|e| ImportError::io(format!("seeking {}", self.path.display()), e))?;
            Ok(Opened {
                stream: Box::pin(ReaderStream::with_capacity(file, FILE_CHUNK)),
                start: offset,
                total,
                validator: None,
                content_type: None,
            })
        })
    }

    fn probe_len(&self) -> BoxFuture<'_, Option<u64>> {
        Box::pin(async move { tokio::fs::metadata(&self.path).await.ok().map(|m| m.len()) })
    }

    fn kind(&self) -> &'static str {
        "file"
    }
}
