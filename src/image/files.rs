//! Listing the images of a folder tree in a fixed order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// File name extensions of the images the engine reads (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// One image found by [`find_images`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageEntry {
    /// Path relative to the searched folder, components joined with `/`.
    pub rel: String,
    /// The full path (the searched folder joined with `rel`).
    pub path: PathBuf,
}

/// True when the file name ends in one of [`IMAGE_EXTENSIONS`].
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every image under `dir`, recursively (following symbolic links), sorted by the bytes of
/// the UTF-8 relative path. A regular file that is not an image, a folder with no image, a
/// missing folder or a name that is not UTF-8 is an error naming the path.
pub fn find_images(dir: &Path) -> Result<Vec<ImageEntry>> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::file(dir, "not a folder"));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    walk(dir, "", &mut out, &mut seen)?;
    if out.is_empty() {
        return Err(Error::file(
            dir,
            format!("no images ({}) in this folder", IMAGE_EXTENSIONS.join(", ")),
        ));
    }
    out.sort_by(|a, b| a.rel.as_bytes().cmp(b.rel.as_bytes()));
    Ok(out)
}

fn walk(
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ImageEntry>,
    seen: &mut HashSet<PathBuf>,
) -> Result<()> {
    // Guard against symbolic-link cycles.
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| Error::file(&path, "file name is not valid UTF-8"))?;
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        // `metadata` follows symbolic links; a dangling link is an error naming it.
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, &rel, out, seen)?;
        } else if meta.is_file() {
            if !is_image_path(&path) {
                return Err(Error::file(
                    &path,
                    format!(
                        "not an image file (expected one of the extensions {})",
                        IMAGE_EXTENSIONS.join(", ")
                    ),
                ));
            }
            out.push(ImageEntry { rel, path });
        }
    }
    Ok(())
}
