//! Typed n-dimensional arrays in shared memory, described the way numpy
//! describes them (`<f8`, `|b1`, ...), so Rust and Python processes read each
//! other's arrays without copying.
//!
//! One array travels as a [`crate::message`] with one table entry and an
//! empty payload.

use ndarray::{ArrayViewD, ArrayViewMutD, IxDyn, ShapeBuilder};

use crate::arena::{Arena, Block};
use crate::error::{Error, Result};
use crate::message::{self, Entry};

/// Most dimensions of an array (numpy's limit).
pub const MAX_NDIM: usize = 64;

/// A plain-old-data element type with a numpy dtype string.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value.
pub unsafe trait Element: Copy + 'static {
    const DTYPE: &'static str;
}

macro_rules! element {
    ($($t:ty => $d:expr),* $(,)?) => {$(
        // SAFETY: primitive numeric types accept every bit pattern.
        unsafe impl Element for $t { const DTYPE: &'static str = $d; }
    )*};
}

#[cfg(target_endian = "little")]
element!(f64 => "<f8", f32 => "<f4", i64 => "<i8", i32 => "<i4", i16 => "<i2", i8 => "|i1",
         u64 => "<u8", u32 => "<u4", u16 => "<u2", u8 => "|u1");

/// Where an array lies inside its block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayMeta {
    pub dtype: String,
    pub itemsize: usize,
    pub shape: Vec<usize>,
    /// Strides in bytes (may be negative).
    pub strides: Vec<isize>,
    /// Byte offset of element `[0, 0, ...]` from the start of the block.
    pub offset: usize,
}

impl ArrayMeta {
    /// C-order layout for `shape` starting at offset 0.
    pub fn c_order(dtype: &str, itemsize: usize, shape: &[usize]) -> ArrayMeta {
        let mut strides = vec![0isize; shape.len()];
        let mut acc = itemsize as isize;
        for i in (0..shape.len()).rev() {
            strides[i] = acc;
            acc *= shape[i].max(1) as isize;
        }
        ArrayMeta {
            dtype: dtype.to_string(),
            itemsize,
            shape: shape.to_vec(),
            strides,
            offset: 0,
        }
    }

    /// An error unless every element lies inside `[0, block_len)`.
    pub fn check_bounds(&self, block_len: usize) -> Result<()> {
        let bad = || Error::InvalidHandle("array view lies outside its shared block".into());
        if self.shape.len() != self.strides.len() || self.shape.len() > MAX_NDIM {
            return Err(bad());
        }
        if self.shape.contains(&0) {
            return if self.offset <= block_len {
                Ok(())
            } else {
                Err(bad())
            };
        }
        // i128 holds one span exactly (u64 x i64); the sums are checked.
        let mut lo: i128 = self.offset as i128;
        let mut hi: i128 = self.offset as i128 + self.itemsize as i128;
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            let span = (n as i128 - 1) * s as i128;
            let side = if span < 0 { &mut lo } else { &mut hi };
            *side = side.checked_add(span).ok_or_else(bad)?;
        }
        if lo < 0 || hi > block_len as i128 {
            return Err(bad());
        }
        Ok(())
    }

    /// Bytes of the elements (saturating: a layout this large never passes
    /// [`ArrayMeta::check_bounds`]).
    pub fn nbytes(&self) -> usize {
        self.shape
            .iter()
            .try_fold(self.itemsize, |acc, &n| acc.checked_mul(n))
            .unwrap_or(usize::MAX)
    }
}

/// An n-dimensional array in shared memory.
#[derive(Debug, Clone)]
pub struct SharedArray {
    block: Block,
    meta: ArrayMeta,
}

impl SharedArray {
    /// A zero-filled C-order array of `T`.
    pub fn zeros<T: Element>(arena: &Arena, shape: &[usize]) -> Result<SharedArray> {
        let meta = ArrayMeta::c_order(T::DTYPE, std::mem::size_of::<T>(), shape);
        let block = arena.alloc(meta.nbytes(), false)?;
        // SAFETY: the block was just allocated and is referenced only here.
        unsafe { std::ptr::write_bytes(block.as_ptr(), 0, block.len()) };
        Ok(SharedArray { block, meta })
    }

    /// A shared C-order copy of `a`.
    pub fn from_view<T: Element>(arena: &Arena, a: ArrayViewD<'_, T>) -> Result<SharedArray> {
        let mut out = SharedArray::zeros::<T>(arena, a.shape())?;
        // SAFETY: the array was just made; no other clone, handle or process
        // can see its memory yet.
        unsafe { out.view_mut::<T>() }?.assign(&a);
        Ok(out)
    }

    pub fn meta(&self) -> &ArrayMeta {
        &self.meta
    }

    pub fn block(&self) -> &Block {
        &self.block
    }

    pub fn shape(&self) -> &[usize] {
        &self.meta.shape
    }

    pub fn dtype(&self) -> &str {
        &self.meta.dtype
    }

    fn element_layout<T: Element>(&self) -> Result<(IxDyn, IxDyn)> {
        if self.meta.dtype != T::DTYPE {
            return Err(Error::InvalidArgument(format!(
                "array has dtype {}, not {}",
                self.meta.dtype,
                T::DTYPE
            )));
        }
        let size = std::mem::size_of::<T>() as isize;
        let mut strides = Vec::with_capacity(self.meta.strides.len());
        for &s in &self.meta.strides {
            if s < 0 || s % size != 0 {
                return Err(Error::InvalidArgument("only arrays with non-negative, element-aligned strides can be viewed from Rust; share a contiguous copy".into()));
            }
            strides.push((s / size) as usize);
        }
        if (self.block.as_ptr() as usize + self.meta.offset) % std::mem::align_of::<T>() != 0 {
            return Err(Error::InvalidArgument(
                "array data is not aligned for its element type".into(),
            ));
        }
        Ok((IxDyn(&self.meta.shape), IxDyn(&strides)))
    }

    /// Reads the array as an `ndarray` view. Writes by other processes are
    /// visible through it; synchronising with them is up to the program.
    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>> {
        let (shape, strides) = self.element_layout::<T>()?;
        // SAFETY: the layout was bounds-checked against the block when the
        // array was made or decoded, the dtype matches T, strides are
        // non-negative and aligned, and the block lives as long as `self`.
        Ok(unsafe {
            ArrayViewD::from_shape_ptr(
                shape.strides(strides),
                self.block.as_ptr().add(self.meta.offset) as *const T,
            )
        })
    }

    /// A mutable `ndarray` view.
    ///
    /// # Safety
    /// `SharedArray` is `Clone` and its memory is shared with every process
    /// that opened it: `&mut self` does not make the view exclusive. The
    /// caller must know that, while the view lives, no other clone in this
    /// process, and no other process, reads or writes the array (for example:
    /// it was just made and not yet sent, or the program hands ownership over
    /// explicitly).
    pub unsafe fn view_mut<T: Element>(&mut self) -> Result<ArrayViewMutD<'_, T>> {
        if self.block.readonly() {
            return Err(Error::InvalidArgument("array is read-only".into()));
        }
        let (shape, strides) = self.element_layout::<T>()?;
        // SAFETY: as in `view`; exclusivity is the caller's promise.
        Ok(unsafe {
            ArrayViewMutD::from_shape_ptr(
                shape.strides(strides),
                self.block.as_ptr().add(self.meta.offset) as *mut T,
            )
        })
    }

    /// Encodes the array as a message for another process: one table
    /// entry, no payload. Pins the block (for this process) until the
    /// receiver opens it.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let entry = Entry {
            handle: self.block.handle()?,
            layout: self.meta.clone(),
        };
        message::encode(&[(entry, message::key_of(self.block.arena()))], &[])
    }

    /// Opens an array message made by any process of this user.
    pub fn from_bytes(bytes: &[u8]) -> Result<SharedArray> {
        let entry = single_entry(message::decode_any(bytes)?)?;
        let block = crate::open(&entry.handle)?;
        Ok(SharedArray {
            block,
            meta: entry.layout,
        })
    }

    /// Opens an array message whose block lies in `arena` (when the arena is
    /// not found through `MEMSHARE_DIR`).
    pub fn from_bytes_in(arena: &Arena, bytes: &[u8]) -> Result<SharedArray> {
        let entry = single_entry(message::decode_in(arena, bytes)?)?;
        let block = arena.open(&entry.handle)?;
        Ok(SharedArray {
            block,
            meta: entry.layout,
        })
    }

    /// Wraps a block opened from a message entry with that entry's layout.
    pub fn from_entry(block: Block, layout: ArrayMeta) -> Result<SharedArray> {
        layout.check_bounds(block.len())?;
        Ok(SharedArray {
            block,
            meta: layout,
        })
    }
}

fn single_entry(d: message::Decoded<'_>) -> Result<Entry> {
    if d.entries.len() != 1 || !d.payload.is_empty() {
        return Err(Error::InvalidHandle(
            "message is not a single array (one entry, no payload)".into(),
        ));
    }
    Ok(d.entries.into_iter().next().expect("one entry"))
}
