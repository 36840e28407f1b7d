//! CLIP byte-level BPE tokenizer, id for id the same as Hugging Face `transformers.CLIPTokenizer`
//! (transformers 5, backed by the `tokenizers` library).
//!
//! The pipeline, as `tokenizers` runs it:
//! 1. the special tokens `<|startoftext|>` / `<|endoftext|>` written literally in the raw text
//!    are cut out first (case-sensitive, before any normalisation) and become their ids;
//! 2. every other segment is normalised: NFC, then `\s+` → `" "`, then lower-cased char by char
//!    (`char::to_lowercase`, so `Σ` always becomes `σ`, never the final `ς`);
//! 3. it is split with the CLIP pattern
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`,
//!    keeping the matches and dropping the rest (only white space is ever dropped);
//! 4. the byte-level pre-tokenizer splits each piece again with the GPT-2 pattern (this only
//!    matters for a normalised `<|endoftext|>`-like piece, which becomes `<|`, `endoftext`, `|>`)
//!    and maps each UTF-8 byte to its printable stand-in char;
//! 5. BPE with `</w>` appended to the last char of each word, merges applied lowest rank first,
//!    leftmost first (the `tokenizers` algorithm); a char missing from the vocabulary becomes the
//!    unknown token `<|endoftext|>`;
//! 6. `<|startoftext|>` … `<|endoftext|>` around the ids; truncation keeps the first
//!    `context_length − 2` ids (BOS + 75 + EOS for CLIP's 77).
//!
//! The vocabulary comes from a model folder (`tokenizer.json`, or `vocab.json` + `merges.txt`)
//! or from OpenAI's `bpe_simple_vocab_16e6.txt.gz`, embedded in the binary.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

use regex::Regex;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// CLIP's text context length: BOS + 75 tokens + EOS.
pub const CONTEXT_LENGTH: usize = 77;
/// The start-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token; also the padding and the unknown token.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// OpenAI's merges list, shipped with open_clip (MIT); see assets/LICENSES.md.
static EMBEDDED_BPE_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// CLIP uses the first 49152 − 256 − 2 merges of the file.
const EMBEDDED_MERGES: usize = 49152 - 256 - 2;

/// The CLIP pre-tokenizer pattern (`tokenizers`' Split, behaviour "removed", inverted).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// GPT-2's pattern as the byte-level pre-tokenizer uses it, without the white-space
/// alternatives: the pieces it sees never contain white space.
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// Words cached at most (the cache is cleared when full).
const CACHE_CAPACITY: usize = 100_000;

/// Token → id.
type Vocab = HashMap<String, u32>;
/// Merges in rank order, as token strings.
type MergeList = Vec<(String, String)>;

/// A CLIP tokenizer. Cheap to clone (shared state); safe to use from many threads.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    vocab: Vocab,
    tokens: HashMap<u32, String>,
    /// Merges in rank order, as token strings (kept to export them).
    merge_list: MergeList,
    /// (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of the stand-in char of each byte, inside a word and at its end (with `</w>`).
    byte_ids: [Option<u32>; 256],
    byte_end_ids: [Option<u32>; 256],
    bos: u32,
    eos: u32,
    clip_re: Regex,
    byte_level_re: Regex,
    /// Normalised piece → its ids.
    cache: RwLock<HashMap<String, Arc<[u32]>>>,
}

/// A batch of encoded texts, padded on the right with the pad id (= EOS) to the longest one.
///
/// Note for pooling: HF CLIP pools the text tower at the FIRST EOS id of each row, which is
/// `lengths[i] − 1` unless the text itself contained a literal `<|endoftext|>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Row-major ids, `[lengths.len(), seq_len]`.
    pub ids: Vec<u32>,
    /// Each row's real length (BOS and EOS included); the attention mask is `j < lengths[i]`.
    pub lengths: Vec<usize>,
    /// The padded length: the longest row.
    pub seq_len: usize,
}

impl Batch {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Row `i`'s ids, padding included.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[i * self.seq_len..(i + 1) * self.seq_len]
    }

    /// The attention mask as HF writes it: 1 for real tokens, 0 for padding, `[len, seq_len]`.
    pub fn attention_mask(&self) -> Vec<u32> {
        let mut mask = Vec::with_capacity(self.ids.len());
        for &l in &self.lengths {
            mask.extend((0..self.seq_len).map(|j| u32::from(j < l)));
        }
        mask
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.vocab.len())
            .field("merges", &self.inner.merge_list.len())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .finish()
    }
}

impl Tokenizer {
    /// The tokenizer of OpenAI CLIP, from the embedded `bpe_simple_vocab_16e6.txt.gz`
    /// (49408 tokens; the same vocabulary as HF's `openai/clip-vit-base-patch16`). The file is
    /// decoded once per process, on first use.
    pub fn embedded() -> Tokenizer {
        static EMBEDDED: OnceLock<Tokenizer> = OnceLock::new();
        EMBEDDED
            .get_or_init(|| {
                let src = Path::new("<embedded>/bpe_simple_vocab_16e6.txt.gz");
                // The asset is part of the build and checked by tests: failing here is a bug.
                let (vocab, merges) =
                    embedded_vocab_and_merges().expect("the embedded CLIP vocabulary is corrupt");
                Tokenizer::build(vocab, merges, src, src)
                    .expect("the embedded CLIP vocabulary is inconsistent")
            })
            .clone()
    }

    /// The tokenizer of a model folder: its `tokenizer.json` if present (only `model.vocab` and
    /// `model.merges` are read; the pipeline is always CLIP's, as in transformers 5), else its
    /// `vocab.json` + `merges.txt`. `Ok(None)` when the folder has none of these files.
    pub fn from_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let tokenizer_json = dir.join("tokenizer.json");
        if tokenizer_json.is_file() {
            return Tokenizer::from_tokenizer_json(&tokenizer_json).map(Some);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        match (vocab.is_file(), merges.is_file()) {
            (true, true) => Tokenizer::from_vocab_merges(&vocab, &merges).map(Some),
            (true, false) => Err(Error::file(
                &merges,
                format!("missing: {} needs it", vocab.display()),
            )),
            (false, true) => Err(Error::file(
                &vocab,
                format!("missing: {} needs it", merges.display()),
            )),
            (false, false) => Ok(None),
        }
    }

    /// [`Tokenizer::from_dir`] when `dir` is given and holds tokenizer files, else
    /// [`Tokenizer::embedded`].
    pub fn for_model_dir(dir: Option<&Path>) -> Result<Tokenizer> {
        match dir {
            Some(d) => Ok(Tokenizer::from_dir(d)?.unwrap_or_else(Tokenizer::embedded)),
            None => Ok(Tokenizer::embedded()),
        }
    }

    /// From an HF `vocab.json` (token → id) and `merges.txt` (`a b` per line, `#version` lines
    /// skipped), as `tokenizers`' `BPE.from_file` reads them.
    pub fn from_vocab_merges(vocab_json: &Path, merges_txt: &Path) -> Result<Tokenizer> {
        let text = read_text(vocab_json)?;
        let vocab: Vocab = serde_json::from_str(&text).map_err(|e| {
            Error::file(vocab_json, format!("not a JSON object of token → id: {e}"))
        })?;
        let text = read_text(merges_txt)?;
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with("#version") {
                continue;
            }
            merges.push(parse_merge(line).ok_or_else(|| {
                Error::file(
                    merges_txt,
                    format!("line {}: expected two tokens `a b`, got {line:?}", i + 1),
                )
            })?);
        }
        Tokenizer::build(vocab, merges, vocab_json, merges_txt)
    }

    /// From an HF `tokenizer.json`: `model.vocab` (token → id) and `model.merges` (`"a b"`
    /// strings or `["a", "b"]` pairs).
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
        #[derive(Deserialize)]
        struct File {
            model: Model,
        }
        #[derive(Deserialize)]
        struct Model {
            #[serde(rename = "type")]
            kind: Option<String>,
            vocab: Vocab,
            merges: Vec<MergeEntry>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum MergeEntry {
            Str(String),
            Pair(Vec<String>),
        }

        let text = read_text(path)?;
        let file: File = serde_json::from_str(&text).map_err(|e| {
            Error::file(
                path,
                format!("not a BPE tokenizer.json (model.vocab, model.merges): {e}"),
            )
        })?;
        if let Some(kind) = &file.model.kind {
            if kind != "BPE" {
                return Err(Error::file(
                    path,
                    format!("model.type is {kind:?}, CLIP needs \"BPE\""),
                ));
            }
        }
        let mut merges = Vec::with_capacity(file.model.merges.len());
        for (i, m) in file.model.merges.into_iter().enumerate() {
            let pair = match m {
                MergeEntry::Str(s) => parse_merge(&s),
                MergeEntry::Pair(mut v) if v.len() == 2 => {
                    let b = v.pop().unwrap_or_default();
                    let a = v.pop().unwrap_or_default();
                    Some((a, b))
                }
                MergeEntry::Pair(_) => None,
            };
            merges.push(pair.ok_or_else(|| {
                Error::file(
                    path,
                    format!("model.merges[{i}]: expected \"a b\" or [\"a\", \"b\"]"),
                )
            })?);
        }
        Tokenizer::build(file.model.vocab, merges, path, path)
    }

    /// Checks and indexes a vocabulary; errors name `vocab_src` or `merges_src`.
    fn build(
        vocab: Vocab,
        merge_list: MergeList,
        vocab_src: &Path,
        merges_src: &Path,
    ) -> Result<Tokenizer> {
        let special = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| Error::file(vocab_src, format!("the vocabulary has no {t}")))
        };
        let bos = special(BOS_TOKEN)?;
        let eos = special(EOS_TOKEN)?;

        // As `tokenizers` does: every merge's parts and result must be tokens; a repeated pair
        // keeps its last rank.
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (a, b)) in merge_list.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::file(
                        merges_src,
                        format!(
                            "merge {} ({a} {b}): {t:?} is not in the vocabulary",
                            rank + 1
                        ),
                    )
                })
            };
            let (ia, ib, im) = (id(a)?, id(b)?, id(&format!("{a}{b}"))?);
            let rank = u32::try_from(rank)
                .map_err(|_| Error::file(merges_src, "too many merges".to_string()))?;
            merges.insert((ia, ib), (rank, im));
        }

        let chars = byte_chars();
        let mut byte_ids = [None; 256];
        let mut byte_end_ids = [None; 256];
        for b in 0..256 {
            let c = chars[b];
            byte_ids[b] = vocab.get(c.to_string().as_str()).copied();
            byte_end_ids[b] = vocab.get(format!("{c}</w>").as_str()).copied();
        }

        let tokens = vocab.iter().map(|(t, &i)| (i, t.clone())).collect();
        // Both patterns are constants: they compile or the tests fail.
        let clip_re = Regex::new(CLIP_PATTERN).map_err(|e| Error::invalid(e.to_string()))?;
        let byte_level_re =
            Regex::new(BYTE_LEVEL_PATTERN).map_err(|e| Error::invalid(e.to_string()))?;
        Ok(Tokenizer {
            inner: Arc::new(Inner {
                vocab,
                tokens,
                merge_list,
                merges,
                byte_ids,
                byte_end_ids,
                bos,
                eos,
                clip_re,
                byte_level_re,
                cache: RwLock::new(HashMap::new()),
            }),
        })
    }

    /// The start-of-text id (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.inner.bos
    }

    /// The end-of-text id (49407 for CLIP); also the padding and unknown id.
    pub fn eos_id(&self) -> u32 {
        self.inner.eos
    }

    /// The padding id (= [`Tokenizer::eos_id`]).
    pub fn pad_id(&self) -> u32 {
        self.inner.eos
    }

    /// Number of tokens in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.vocab.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.inner.tokens.get(&id).map(String::as_str)
    }

    /// The vocabulary, token → id (e.g. to write a `vocab.json`).
    pub fn vocab(&self) -> &HashMap<String, u32> {
        &self.inner.vocab
    }

    /// The merges in rank order (e.g. to write a `merges.txt`).
    pub fn merges(&self) -> &[(String, String)] {
        &self.inner.merge_list
    }

    /// The ids of `text` with BOS and EOS, truncated to `context_length` (keeping BOS, the
    /// first `context_length − 2` ids and EOS). A `context_length` below 2 counts as 2.
    pub fn encode(&self, text: &str, context_length: usize) -> Vec<u32> {
        let keep = context_length.saturating_sub(2);
        let mut ids = Vec::with_capacity(keep.min(text.len() + 1) + 2);
        ids.push(self.inner.bos);
        self.encode_into(text, keep, &mut ids);
        ids.push(self.inner.eos);
        ids
    }

    /// The ids of `text` alone: no BOS/EOS, no truncation.
    pub fn encode_plain(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.encode_into(text, usize::MAX, &mut ids);
        ids
    }

    /// [`Tokenizer::encode`] for each text, padded with the pad id to the longest row.
    pub fn encode_batch(&self, texts: &[&str], context_length: usize) -> Batch {
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t, context_length))
            .collect();
        let seq_len = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq_len);
        let mut lengths = Vec::with_capacity(rows.len());
        for r in &rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(self.inner.eos, seq_len - r.len()));
            lengths.push(r.len());
        }
        Batch {
            ids,
            lengths,
            seq_len,
        }
    }

    /// Appends the ids of `text` to `out`, stopping once `limit` ids have been added.
    fn encode_into(&self, text: &str, limit: usize, out: &mut Vec<u32>) {
        let start = out.len();
        let stop = start.saturating_add(limit);
        let mut rest = text;
        while out.len() < stop {
            let Some((pos, token, id)) = self.next_special(rest) else {
                self.encode_segment(rest, stop, out);
                break;
            };
            self.encode_segment(&rest[..pos], stop, out);
            out.push(id);
            rest = &rest[pos + token.len()..];
        }
        out.truncate(stop);
    }

    /// The leftmost literal special token in `s`.
    fn next_special(&self, s: &str) -> Option<(usize, &'static str, u32)> {
        let mut best: Option<(usize, &'static str, u32)> = None;
        for (token, id) in [(BOS_TOKEN, self.inner.bos), (EOS_TOKEN, self.inner.eos)] {
            if let Some(pos) = s.find(token) {
                if best.is_none_or(|(p, _, _)| pos < p) {
                    best = Some((pos, token, id));
                }
            }
        }
        best
    }

    /// Normalises, splits and BPE-encodes a segment free of literal special tokens.
    fn encode_segment(&self, segment: &str, stop: usize, out: &mut Vec<u32>) {
        if segment.is_empty() {
            return;
        }
        // NFC, then lower-case char by char. (`\s+` → " " is skipped: the split below drops
        // every white-space char anyway and no piece contains one.)
        let normalized: String = segment.nfc().flat_map(char::to_lowercase).collect();
        for m in self.inner.clip_re.find_iter(&normalized) {
            if out.len() >= stop {
                return;
            }
            self.encode_piece(m.as_str(), out);
        }
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        let inner = &self.inner;
        if let Ok(cache) = inner.cache.read() {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let start = out.len();
        for word in inner.byte_level_re.find_iter(piece) {
            self.bpe(word.as_str().as_bytes(), out);
        }
        if let Ok(mut cache) = inner.cache.write() {
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(piece.to_string(), out[start..].into());
        }
    }

    /// BPE of one word (its UTF-8 bytes), exactly as `tokenizers`' `Word::merge_all`: a
    /// min-heap on (rank, position); stale entries are skipped.
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        let inner = &self.inner;
        let n = word.len();
        if n == 0 {
            return;
        }
        // Symbols as a linked list; an unknown byte becomes the unknown (= EOS) token.
        let mut ids: Vec<u32> = Vec::with_capacity(n);
        for (i, &b) in word.iter().enumerate() {
            let id = if i + 1 == n {
                inner.byte_end_ids[b as usize]
            } else {
                inner.byte_ids[b as usize]
            };
            ids.push(id.unwrap_or(inner.eos));
        }
        if n == 1 {
            out.push(ids[0]);
            return;
        }
        let mut prev: Vec<isize> = (0..n as isize).map(|i| i - 1).collect();
        let mut next: Vec<isize> = (1..=n as isize).collect();
        next[n - 1] = -1;
        let mut alive = vec![true; n];

        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        // Reverse((rank, pos, new_id)): lowest rank first, then leftmost.
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            if let Some(&(rank, new_id)) = inner.merges.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            if !alive[pos] || next[pos] < 0 {
                continue;
            }
            let right = next[pos] as usize;
            match inner.merges.get(&(ids[pos], ids[right])) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue, // stale entry
            }
            ids[pos] = new_id;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] >= 0 {
                prev[next[pos] as usize] = pos as isize;
            }
            if prev[pos] >= 0 {
                let p = prev[pos] as usize;
                if let Some(&(rank, id)) = inner.merges.get(&(ids[p], ids[pos])) {
                    heap.push(Reverse((rank, p, id)));
                }
            }
            if next[pos] >= 0 {
                let q = next[pos] as usize;
                if let Some(&(rank, id)) = inner.merges.get(&(ids[pos], ids[q])) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
        }
        out.extend(
            ids.iter()
                .zip(&alive)
                .filter(|(_, &a)| a)
                .map(|(&id, _)| id),
        );
    }
}

/// `"a b"` → `("a", "b")`; anything else (one token, three, empty) → `None`.
fn parse_merge(line: &str) -> Option<(String, String)> {
    let mut parts = line.split(' ');
    let (a, b) = (parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((a.to_string(), b.to_string()))
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| Error::file(path, format!("not UTF-8: {e}")))
}

/// GPT-2's byte → printable char table (`bytes_to_unicode`): printable Latin-1 bytes stand for
/// themselves, the others map to U+0100 onwards in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut table = ['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// The OpenAI CLIP vocabulary (token → id) and merges from the embedded gz: the 256 byte
/// chars in the order of `bytes_to_unicode`, the same with `</w>`, one token per merge, then
/// `<|startoftext|>` and `<|endoftext|>` — 49408 tokens.
fn embedded_vocab_and_merges() -> Result<(Vocab, MergeList)> {
    let src = Path::new("<embedded>/bpe_simple_vocab_16e6.txt.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(EMBEDDED_BPE_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(src, e))?;
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < EMBEDDED_MERGES + 1 {
        return Err(Error::file(src, "too few merges"));
    }
    let mut merges = Vec::with_capacity(EMBEDDED_MERGES);
    for (i, line) in lines[1..=EMBEDDED_MERGES].iter().enumerate() {
        merges.push(
            parse_merge(line)
                .ok_or_else(|| Error::file(src, format!("line {}: bad merge", i + 2)))?,
        );
    }

    // `bytes_to_unicode().values()` order: the printable bytes first, then the others.
    let chars = byte_chars();
    let mut order: Vec<char> = chars.to_vec();
    order.sort_unstable();
    let mut tokens: Vec<String> = Vec::with_capacity(2 * 256 + merges.len() + 2);
    tokens.extend(order.iter().map(|c| c.to_string()));
    tokens.extend(order.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS_TOKEN.to_string());
    tokens.push(EOS_TOKEN.to_string());
    let vocab: Vocab = tokens.into_iter().zip(0u32..).collect();
    if vocab.len() != 2 * 256 + EMBEDDED_MERGES + 2 {
        return Err(Error::file(src, "repeated tokens"));
    }
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], '\u{120}'); // Ġ
        assert_eq!(t[0], '\u{100}');
        assert_eq!(t[0xad], '\u{143}');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn embedded_basics() {
        let tok = Tokenizer::embedded();
        assert_eq!(tok.vocab_size(), 49408);
        assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
        assert_eq!(
            tok.encode("a photo of a cat", CONTEXT_LENGTH),
            [49406, 320, 1125, 539, 320, 2368, 49407]
        );
    }
}
