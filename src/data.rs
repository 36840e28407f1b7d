//! Datasets as the reference reads them: an ID split is an ImageFolder (one sub-folder per
//! class) whose class names are matched to a label set; an OOD set is a folder of images at any
//! depth. Label sets: the presets `imagenet1k` and `voc` (the reference's names) or a file.

use crate::error::{Error, Result};
use crate::image::{find_images, ImageEntry};
use std::path::Path;

const IMAGENET1K: &str = include_str!("../assets/labels/imagenet1k.txt");
const VOC: &str = include_str!("../assets/labels/voc.txt");

/// The class names prompts are built from, in label-index order.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelSet {
    pub name: String,
    pub classes: Vec<String>,
}

impl LabelSet {
    /// `imagenet1k`, `voc`, or a path to a file with one class name per line.
    pub fn resolve(spec: &str) -> Result<LabelSet> {
        let from = |name: &str, text: &str| LabelSet {
            name: name.into(),
            classes: text.lines().map(str::to_string).collect(),
        };
        match spec {
            "imagenet1k" => Ok(from("imagenet1k", IMAGENET1K)),
            "voc" => Ok(from("voc", VOC)),
            path => {
                let p = Path::new(path);
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                let classes: Vec<String> = text
                    .lines()
                    .map(|l| l.trim_end_matches('\r').trim().to_string())
                    .collect();
                let classes: Vec<String> = classes.into_iter().filter(|c| !c.is_empty()).collect();
                if classes.is_empty() {
                    return Err(Error::file(p, "holds no class names (one per line)"));
                }
                Ok(LabelSet {
                    name: p.display().to_string(),
                    classes,
                })
            }
        }
    }

    /// `"a photo of a {class}"` for every class, as the reference prompts.
    pub fn prompts(&self) -> Vec<String> {
        self.classes
            .iter()
            .map(|c| format!("a photo of a {c}"))
            .collect()
    }
}

/// One labelled image.
#[derive(Clone, Debug)]
pub struct LabelledImage {
    pub image: ImageEntry,
    pub label: usize,
}

/// The reference's folder-name normalisation for non-ImageNet sets: the lower-case letter runs
/// joined by spaces ("tv_monitor" → "tv monitor").
fn letters_only(name: &str) -> String {
    name.to_lowercase()
        .split(|c: char| !c.is_ascii_lowercase())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_wordnet_id(name: &str) -> bool {
    name.len() == 9 && name.starts_with('n') && name[1..].bytes().all(|b| b.is_ascii_digit())
}

/// An ImageFolder: class folders of `dir` (sorted), each matched to a label by exact name, then
/// by the reference's letters-only normalisation; ImageNet's WordNet-id folders (n01440764 …)
/// map in sorted order when there is one per label. Images in each folder are found
/// recursively and listed in ImageFolder order (by class, then path).
pub fn image_folder(dir: &Path, labels: &LabelSet) -> Result<Vec<LabelledImage>> {
    let read = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut classes: Vec<String> = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if path.is_dir() {
            classes.push(entry.file_name().to_string_lossy().into_owned());
        } else if !entry.file_name().to_string_lossy().starts_with('.') {
            return Err(Error::file(
                &path,
                "an ID split holds one sub-folder per class, not loose files",
            ));
        }
    }
    classes.sort();
    if classes.is_empty() {
        return Err(Error::file(
            dir,
            "holds no class folders (an ID split is one sub-folder per class)",
        ));
    }
    let wordnet = classes.iter().all(|c| is_wordnet_id(c)) && classes.len() == labels.classes.len();
    let normalised: Vec<String> = labels.classes.iter().map(|c| letters_only(c)).collect();
    let mut out = Vec::new();
    for (i, class) in classes.iter().enumerate() {
        let label = if wordnet {
            i
        } else if let Some(l) = labels.classes.iter().position(|c| c == class) {
            l
        } else if let Some(l) = normalised.iter().position(|c| *c == letters_only(class)) {
            l
        } else {
            return Err(Error::file(
                dir.join(class),
                format!(
                    "class folder \"{class}\" is not in the label set {} ({} classes; pass --labels FILE with your class names)",
                    labels.name,
                    labels.classes.len()
                ),
            ));
        };
        for image in find_images(&dir.join(class))? {
            let rel = format!("{class}/{}", image.rel);
            out.push(LabelledImage {
                image: ImageEntry {
                    rel,
                    path: image.path,
                },
                label,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_reference_sizes() {
        let inet = LabelSet::resolve("imagenet1k").unwrap();
        assert_eq!(inet.classes.len(), 1000);
        assert_eq!(inet.classes[0], "tench");
        assert_eq!(LabelSet::resolve("voc").unwrap().classes.len(), 14);
        assert_eq!(inet.prompts()[1], "a photo of a goldfish");
    }

    #[test]
    fn folder_names_normalise_like_the_reference() {
        assert_eq!(letters_only("tv_monitor"), "tv monitor");
        assert_eq!(letters_only("diningtable"), "diningtable");
        assert!(is_wordnet_id("n01440764"));
        assert!(!is_wordnet_id("cat"));
    }
}
