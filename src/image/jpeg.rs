//! JPEG decoding with libjpeg-turbo's algorithms (mozjpeg's decoder: ISLOW integer IDCT, fancy
//! upsampling, libjpeg colour conversion), which is what PIL uses, so the pixels match PIL's
//! bit for bit. Colour handling follows PIL's JPEG plugin: 1 component → grey, 3 → RGB (libjpeg
//! picks YCbCr or RGB from the JFIF/Adobe markers), 4 → CMYK as Adobe writes it (inverted),
//! then PIL's `convert("RGB")` formulas.
//!
//! libjpeg reports fatal errors by calling `error_exit`, which must not return; ours unwinds
//! (`resume_unwind`, no panic message) through the C code, built with `-fexceptions` by
//! mozjpeg-sys's `unwinding` feature, to the `catch_unwind` in [`decode_jpeg`] (so the crate
//! must not be built with `panic = "abort"`, where a corrupt JPEG would abort). Warnings are
//! ignored as PIL ignores them, except "premature end of JPEG file" (the data ends before the
//! EOI marker), which PIL reports as a truncated file.

use std::os::raw::{c_int, c_ulong};
use std::panic::{catch_unwind, AssertUnwindSafe};

use mozjpeg_sys as ffi;

use super::decode::{alloc_pixels, check_size, cmyk_to_rgb};
use super::RgbImage;

/// The payload of the unwind started by [`error_exit`].
struct JpegFatal(String);

/// libjpeg's decoder state and its error manager, boxed so that their addresses stay fixed.
struct State {
    cinfo: ffi::jpeg_decompress_struct,
    err: ffi::jpeg_error_mgr,
}

/// libjpeg's message for the current `msg_code`.
unsafe fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    let err = &*cinfo.err;
    let Some(format) = err.format_message else {
        return format!("libjpeg error {}", err.msg_code);
    };
    // The binding declares the output buffer as `&[u8; 80]` but libjpeg writes into it.
    type Format = unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8);
    let format: Format = std::mem::transmute::<
        unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, &[u8; 80]),
        Format,
    >(format);
    let mut buf = [0u8; 200];
    format(cinfo, buf.as_mut_ptr());
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let msg = unsafe { message(cinfo) };
    std::panic::resume_unwind(Box::new(JpegFatal(msg)));
}

/// Silence libjpeg's warnings, but count "premature end of JPEG file" in `num_warnings`.
extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    unsafe {
        let err = &mut *cinfo.err;
        if level < 0 && err.msg_code == ffi::JWRN_JPEG_EOF {
            err.num_warnings += 1;
        }
    }
}

/// Decode a JPEG held in memory to 8-bit RGB, as `PIL.Image.open(f).convert("RGB")`.
/// The error is a message without the file name.
pub(super) fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    // SAFETY: both structs are plain C data for which all-zero is the state libjpeg expects
    // before `jpeg_std_error` / `jpeg_create_decompress` (null pointers, zero counts).
    let mut st: Box<State> = Box::new(unsafe { std::mem::zeroed() });
    unsafe {
        ffi::jpeg_std_error(&mut st.err);
    }
    st.err.error_exit = Some(error_exit);
    st.err.emit_message = Some(emit_message);
    st.cinfo.common.err = &mut st.err;
    let result = catch_unwind(AssertUnwindSafe(|| unsafe { run(&mut st.cinfo, bytes) }));
    // SAFETY: valid after a successful or failed `jpeg_create_decompress`, and on the zeroed
    // struct (it frees nothing when the memory manager is null).
    unsafe { ffi::jpeg_destroy_decompress(&mut st.cinfo) };
    match result {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<JpegFatal>() {
            Ok(fatal) => Err(fatal.0),
            Err(other) => std::panic::resume_unwind(other),
        },
    }
}

/// True once libjpeg has hit the end of the data and padded it with a fake EOI marker.
fn hit_eof(cinfo: &ffi::jpeg_decompress_struct) -> bool {
    unsafe { (*cinfo.common.err).num_warnings > 0 }
}

const TRUNCATED: &str = "image file is truncated (premature end of JPEG data)";

unsafe fn run(cinfo: &mut ffi::jpeg_decompress_struct, bytes: &[u8]) -> Result<RgbImage, String> {
    ffi::jpeg_create_decompress(cinfo);
    ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
    ffi::jpeg_read_header(cinfo, 1);
    if hit_eof(cinfo) {
        return Err(TRUNCATED.into());
    }
    let (space, channels) = match cinfo.num_components {
        1 => (ffi::JCS_GRAYSCALE, 1),
        3 => (ffi::JCS_RGB, 3),
        4 => (ffi::JCS_CMYK, 4),
        n => return Err(format!("cannot handle {n}-component JPEG images")),
    };
    cinfo.out_color_space = space;
    cinfo.dct_method = ffi::J_DCT_METHOD::JDCT_ISLOW;
    cinfo.do_fancy_upsampling = 1;
    check_size(cinfo.image_width as usize, cinfo.image_height as usize)?;
    ffi::jpeg_start_decompress(cinfo);
    if hit_eof(cinfo) {
        return Err(TRUNCATED.into());
    }
    let (w, h) = (cinfo.output_width as usize, cinfo.output_height as usize);
    if cinfo.output_components as usize != channels {
        return Err(format!(
            "unexpected {} output components",
            cinfo.output_components
        ));
    }
    let mut buf = alloc_pixels(w, h, channels)?;
    let stride = w * channels;
    while (cinfo.output_scanline as usize) < h {
        let y = cinfo.output_scanline as usize;
        let mut row = buf[y * stride..].as_mut_ptr();
        if ffi::jpeg_read_scanlines(cinfo, &mut row, 1) != 1 || hit_eof(cinfo) {
            return Err(TRUNCATED.into());
        }
    }
    // PIL also needs the data up to the EOI marker: a file cut anywhere before it is truncated.
    ffi::jpeg_finish_decompress(cinfo);
    if hit_eof(cinfo) {
        return Err(TRUNCATED.into());
    }
    let data = match channels {
        1 => {
            let mut rgb = alloc_pixels(w, h, 3)?;
            for (o, &v) in rgb.chunks_exact_mut(3).zip(&buf) {
                o.fill(v);
            }
            rgb
        }
        3 => buf,
        _ => {
            // PIL reads 4-component JPEGs as Adobe-style inverted CMYK ("CMYK;I").
            for v in buf.iter_mut() {
                *v = 255 - *v;
            }
            cmyk_to_rgb(&buf, w, h)?
        }
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}
