//! The server's WebSocket framing (RFC 6455), with buffers that never keep a
//! large frame's size (trap 14).
//!
//! tungstenite keeps the capacity of its read buffer and its out-buffer at
//! the high-water mark of the largest frame a connection ever carried, and
//! offers no way to shrink them; one 60 KB broadcast to 100,000 connections
//! would leave about 6 GiB behind. Here:
//!
//! * the read buffer is a fixed allocation of `--read-buffer-bytes`, never
//!   grown; a payload that does not fit is read into an allocation of its
//!   exact size, handed to the caller as the message and freed with it;
//! * nothing is copied into an out-buffer: a frame being written is its
//!   header (on the stack of this struct) plus the message's own `Bytes`,
//!   dropped as soon as the last byte is written.
//!
//! So an idle connection holds the read buffer and nothing else, whatever it
//! carried before. The interface is axum's (`Sink` + `Stream` of
//! `axum::extract::ws::Message` with `axum::Error`), so the connection loop
//! does not know which socket it drives.
//!
//! Everything a client can get wrong is a [`Violation`] carrying the close
//! code the connection must answer with (see [`violation`]): 1002 for broken
//! framing (unmasked frame, reserved bits, unknown opcode, oversize or
//! fragmented control frame, continuation out of place, one-byte close
//! payload, a close code that is not allowed on the wire), 1007 for text or
//! a close reason that is not UTF-8, 1009 for a frame or message above the
//! limits. A ping is answered with a pong (and still yielded); a close is
//! answered with a close echoing its code, yielded, and then the stream
//! ends. No allocation is ever larger than `max_frame_bytes` (one frame) or
//! `max_message_bytes` (fragments being joined).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::protocol::close;

/// A client broke the protocol or a limit: the connection is closed with
/// `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

/// The violation behind a read error, if the error is one (and not the
/// network failing).
pub fn violation(error: &axum::Error) -> Option<Violation> {
    std::error::Error::source(error)?
        .downcast_ref::<Violation>()
        .copied()
}

/// Close codes a peer may send (RFC 6455 section 7.4): the defined ones
/// except those reserved for local use (1004-1006, 1015), IANA-registered
/// 1012-1014, and the library/application ranges 3000-4999.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn violation_error(code: u16, reason: &'static str) -> axum::Error {
    axum::Error::new(Violation { code, reason })
}

fn protocol(reason: &'static str) -> axum::Error {
    violation_error(close::PROTOCOL_ERROR, reason)
}

fn not_utf8() -> axum::Error {
    violation_error(close::INVALID_PAYLOAD, "text is not UTF-8")
}

fn io_error(e: io::Error) -> axum::Error {
    axum::Error::new(e)
}

/// Limits and sizes of one socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketConfig {
    /// The fixed read buffer (frame headers and small frames).
    pub read_buffer_bytes: usize,
    /// Largest frame payload accepted.
    pub max_frame_bytes: usize,
    /// Largest message (all fragments together) accepted.
    pub max_message_bytes: usize,
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A frame header being read.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    /// RSV1-3: no extension is negotiated, so they must be 0.
    reserved: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: usize,
}

/// One frame on its way out: its header, then its payload.
#[derive(Debug)]
struct Outgoing {
    head: [u8; 10],
    head_len: u8,
    /// Bytes of header and payload together already written.
    written: usize,
    payload: Bytes,
}

impl Outgoing {
    fn new(opcode: u8, payload: Bytes) -> Self {
        let mut head = [0u8; 10];
        head[0] = 0x80 | opcode;
        let len = payload.len();
        let head_len = if len < 126 {
            head[1] = len as u8;
            2
        } else if len <= u16::MAX as usize {
            head[1] = 126;
            head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        } else {
            head[1] = 127;
            head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Outgoing {
            head,
            head_len,
            written: 0,
            payload,
        }
    }

    fn close(frame: Option<&CloseFrame>) -> Self {
        let payload = match frame {
            None => Bytes::new(),
            Some(f) => {
                // A control frame carries at most 125 bytes: cut the reason
                // at a character boundary.
                let mut reason = f.reason.as_str();
                while reason.len() > 123 {
                    let mut end = 123;
                    while !reason.is_char_boundary(end) {
                        end -= 1;
                    }
                    reason = &reason[..end];
                }
                let mut p = Vec::with_capacity(2 + reason.len());
                p.extend_from_slice(&f.code.to_be_bytes());
                p.extend_from_slice(reason.as_bytes());
                Bytes::from(p)
            }
        };
        Outgoing::new(OP_CLOSE, payload)
    }

    /// Writes as much as the IO takes; Ready(Ok) once all is written.
    fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let head_len = self.head_len as usize;
        let total = head_len + self.payload.len();
        while self.written < total {
            let n = if self.written < head_len {
                let bufs = [
                    io::IoSlice::new(&self.head[self.written..head_len]),
                    io::IoSlice::new(&self.payload),
                ];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &bufs))?
            } else {
                let from = self.written - head_len;
                ready!(Pin::new(&mut *io).poll_write(cx, &self.payload[from..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The socket of an upgraded HTTP/1.1 connection.
pub type ServerSocket = Socket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A server-side WebSocket over an upgraded connection.
pub struct Socket<IO> {
    io: IO,
    config: SocketConfig,
    /// Fixed-size read buffer; `start..end` holds unread bytes.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The header of the frame whose payload is being read.
    header: Option<Header>,
    /// A payload too large for `buf`, filled to `payload_filled`.
    payload: Vec<u8>,
    payload_filled: usize,
    /// A fragmented message being assembled: its opcode and data so far.
    fragments: Option<(u8, Vec<u8>)>,
    /// The frame `start_send` accepted and the sink is writing.
    sending: Option<Outgoing>,
    /// An automatic answer (pong, close echo) waiting to be written; it goes
    /// out before the next frame of the caller.
    reply: Option<Outgoing>,
    /// This side sent a close: nothing more may be sent.
    sent_close: bool,
    /// The peer's close was yielded, or an error was: the stream has ended.
    ended: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Socket<IO> {
    pub fn new(io: IO, config: SocketConfig) -> Self {
        Socket {
            io,
            config,
            buf: vec![0u8; config.read_buffer_bytes.max(14)].into_boxed_slice(),
            start: 0,
            end: 0,
            header: None,
            payload: Vec::new(),
            payload_filled: 0,
            fragments: None,
            sending: None,
            reply: None,
            sent_close: false,
            ended: false,
        }
    }

    /// The next message, as axum's `WebSocket::recv`.
    pub async fn recv(&mut self) -> Option<Result<Message, axum::Error>> {
        futures_util::StreamExt::next(self).await
    }

    /// Sends and flushes one message, as axum's `WebSocket::send`.
    pub async fn send(&mut self, message: Message) -> Result<(), axum::Error> {
        futures_util::SinkExt::send(self, message).await
    }

    /// Heap bytes this socket holds now beyond its fixed read buffer: what
    /// must return to zero after large frames.
    pub fn spare_heap_bytes(&self) -> usize {
        self.payload.capacity()
            + self.fragments.as_ref().map_or(0, |(_, f)| f.capacity())
            + self.sending.as_ref().map_or(0, |o| o.payload.len())
            + self.reply.as_ref().map_or(0, |o| o.payload.len())
    }

    /// Reads more bytes into `buf`. Ready(Ok(false)) at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        self.end += n;
        Poll::Ready(Ok(n > 0))
    }

    /// Parses a header from `buf` if it is all there.
    fn parse_header(&mut self) -> Result<Option<Header>, axum::Error> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (avail[0], avail[1]);
        let masked = b1 & 0x80 != 0;
        let (len, mut at) = match b1 & 0x7F {
            126 => {
                if avail.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([avail[2], avail[3]]) as u64, 4)
            }
            127 => {
                if avail.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(protocol("64-bit frame length with its top bit set"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let mask = if masked {
            if avail.len() < at + 4 {
                return Ok(None);
            }
            let mut m = [0u8; 4];
            m.copy_from_slice(&avail[at..at + 4]);
            at += 4;
            Some(m)
        } else {
            None
        };
        self.start += at;
        let header = Header {
            fin: b0 & 0x80 != 0,
            reserved: b0 & 0x70 != 0,
            opcode: b0 & 0x0F,
            mask,
            len: usize::try_from(len).unwrap_or(usize::MAX),
        };
        self.check(&header)?;
        Ok(Some(header))
    }

    fn check(&self, h: &Header) -> Result<(), axum::Error> {
        if h.reserved {
            return Err(protocol("reserved bits set without an extension"));
        }
        if h.mask.is_none() {
            return Err(protocol("unmasked frame from a client"));
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err(protocol("fragmented control frame"));
                }
                if h.len > 125 {
                    return Err(protocol("control frame over 125 bytes"));
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                // Checked on the header, before anything is read or
                // allocated for the payload.
                match (h.opcode, &self.fragments) {
                    (OP_CONTINUATION, None) => {
                        return Err(protocol("continuation frame without a message to continue"));
                    }
                    (OP_TEXT | OP_BINARY, Some(_)) => {
                        return Err(protocol("new message while a fragmented one is unfinished"));
                    }
                    _ => {}
                }
                let so_far = self.fragments.as_ref().map_or(0, |(_, f)| f.len());
                if h.len > self.config.max_frame_bytes
                    || so_far.saturating_add(h.len) > self.config.max_message_bytes
                {
                    return Err(violation_error(
                        close::TOO_LARGE,
                        "frame or message too large",
                    ));
                }
            }
            _ => return Err(protocol("unknown opcode")),
        }
        Ok(())
    }

    /// Reads the payload of `header`; Ready(Ok(None)) at end of stream.
    fn poll_payload(
        &mut self,
        cx: &mut Context<'_>,
        header: Header,
    ) -> Poll<Result<Option<Bytes>, axum::Error>> {
        let len = header.len;
        let mut payload = if len <= self.buf.len() {
            // Small: gather it in the read buffer, then copy it out.
            while self.end - self.start < len {
                if self.start + len > self.buf.len() {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                if !ready!(self.poll_fill(cx)).map_err(io_error)? {
                    return Poll::Ready(Ok(None));
                }
            }
            let p = self.buf[self.start..self.start + len].to_vec();
            self.start += len;
            p
        } else {
            // Large: an allocation of exactly its size, which leaves with
            // the message.
            if self.payload.capacity() == 0 {
                self.payload = vec![0u8; len];
                let have = (self.end - self.start).min(len);
                self.payload[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
                self.start += have;
                self.payload_filled = have;
            }
            while self.payload_filled < len {
                let mut read = ReadBuf::new(&mut self.payload[self.payload_filled..]);
                ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)).map_err(io_error)?;
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(None));
                }
                self.payload_filled += n;
            }
            self.payload_filled = 0;
            std::mem::take(&mut self.payload)
        };
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if let Some(mask) = header.mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i & 3];
            }
        }
        Poll::Ready(Ok(Some(Bytes::from(payload))))
    }

    /// Writes the frame the sink accepted, then a pending automatic reply:
    /// in that order, because the accepted frame may be half written and a
    /// reply in its middle would corrupt the stream.
    fn poll_writes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(sending) = &mut self.sending {
            ready!(sending.poll_write(&mut self.io, cx))?;
            self.sending = None;
        }
        if let Some(reply) = &mut self.reply {
            ready!(reply.poll_write(&mut self.io, cx))?;
            self.reply = None;
        }
        Poll::Ready(Ok(()))
    }

    /// Heap and buffer bytes this socket holds now: the fixed read buffer
    /// plus anything a frame in flight needs. Back to `read_buffer_bytes`
    /// once no frame is in flight, whatever sizes came before.
    pub fn buffer_capacity(&self) -> usize {
        self.buf.len() + self.spare_heap_bytes()
    }

    /// Turns one complete frame into what the caller sees, if anything.
    fn on_frame(&mut self, header: Header, payload: Bytes) -> Result<Option<Message>, axum::Error> {
        match header.opcode {
            OP_PING => {
                if !self.sent_close {
                    self.reply = Some(Outgoing::new(OP_PONG, payload.clone()));
                }
                Ok(Some(Message::Ping(payload)))
            }
            OP_PONG => Ok(Some(Message::Pong(payload))),
            OP_CLOSE => {
                let frame = match payload.len() {
                    0 => None,
                    1 => return Err(protocol("close frame with a one-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close_code_allowed(code) {
                            return Err(protocol("close code not allowed on the wire"));
                        }
                        let reason = Utf8Bytes::try_from(payload.slice(2..)).map_err(|_| {
                            violation_error(close::INVALID_PAYLOAD, "close reason is not UTF-8")
                        })?;
                        Some(CloseFrame { code, reason })
                    }
                };
                if !self.sent_close {
                    let echo = frame.as_ref().map(|f| CloseFrame {
                        code: f.code,
                        reason: Utf8Bytes::from_static(""),
                    });
                    self.reply = Some(Outgoing::close(echo.as_ref()));
                    self.sent_close = true;
                }
                self.ended = true;
                Ok(Some(Message::Close(frame)))
            }
            OP_CONTINUATION => {
                let Some((opcode, mut data)) = self.fragments.take() else {
                    return Err(protocol("continuation frame without a message to continue"));
                };
                data.extend_from_slice(&payload);
                if header.fin {
                    self.message(opcode, Bytes::from(data)).map(Some)
                } else {
                    self.fragments = Some((opcode, data));
                    Ok(None)
                }
            }
            opcode => {
                if self.fragments.is_some() {
                    return Err(protocol("new message while a fragmented one is unfinished"));
                }
                if header.fin {
                    self.message(opcode, payload).map(Some)
                } else {
                    self.fragments = Some((opcode, payload.to_vec()));
                    Ok(None)
                }
            }
        }
    }

    fn message(&self, opcode: u8, data: Bytes) -> Result<Message, axum::Error> {
        if opcode == OP_TEXT {
            Utf8Bytes::try_from(data)
                .map(Message::Text)
                .map_err(|_| not_utf8())
        } else {
            Ok(Message::Binary(data))
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Stream for Socket<IO> {
    type Item = Result<Message, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Answers go out while reading, as tungstenite does. No new
            // frame is read while one is still unwritten, so a peer that
            // floods pings without reading pongs cannot queue up answers.
            if this.reply.is_some() {
                match this.poll_writes(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        this.ended = true;
                        return Poll::Ready(Some(Err(io_error(e))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let header = match this.header {
                Some(h) => h,
                None => match this.parse_header() {
                    Err(e) => {
                        this.ended = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Ok(Some(h)) => {
                        this.header = Some(h);
                        h
                    }
                    Ok(None) => match ready!(this.poll_fill(cx)) {
                        Ok(true) => continue,
                        Ok(false) => {
                            this.ended = true;
                            return Poll::Ready(None);
                        }
                        Err(e) => {
                            this.ended = true;
                            return Poll::Ready(Some(Err(io_error(e))));
                        }
                    },
                },
            };
            let payload = match ready!(this.poll_payload(cx, header)) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            this.header = None;
            match this.on_frame(header, payload) {
                Ok(Some(message)) => {
                    // Try the reply now, so a peer waiting for its pong or
                    // close echo gets it even if the caller stops here.
                    if this.reply.is_some()
                        && let Poll::Ready(Err(e)) = this.poll_writes(cx)
                    {
                        this.ended = true;
                        return Poll::Ready(Some(Err(io_error(e))));
                    }
                    return Poll::Ready(Some(Ok(message)));
                }
                Ok(None) => continue,
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Sink<Message> for Socket<IO> {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(this.poll_writes(cx)).map_err(io_error)?;
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.sent_close {
            return Err(io_error(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "send after a close frame",
            )));
        }
        let frame = match message {
            Message::Text(t) => Outgoing::new(OP_TEXT, Bytes::from(t)),
            Message::Binary(b) => Outgoing::new(OP_BINARY, b),
            Message::Ping(p) => Outgoing::new(OP_PING, p),
            Message::Pong(p) => Outgoing::new(OP_PONG, p),
            Message::Close(frame) => {
                this.sent_close = true;
                Outgoing::close(frame.as_ref())
            }
        };
        this.sending = Some(frame);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut *this).poll_ready(cx))?;
        Pin::new(&mut this.io).poll_flush(cx).map_err(io_error)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut *this).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx).map_err(io_error)
    }
}

/// What a socket makes of bytes a client sent: the messages it yields, the
/// violation that ended it (if one did), and the bytes it wrote back
/// (pongs, a close echo). For the fuzz target and its corpus replay
/// (`fuzz/checks.rs`), so they drive the real parser without a runtime.
#[derive(Debug, Default)]
pub struct Decoded {
    pub messages: Vec<Message>,
    pub violation: Option<Violation>,
    /// An error that is not a violation (none is expected from memory).
    pub other_error: Option<String>,
    pub written: Vec<u8>,
    /// The most [`Socket::buffer_capacity`] was right after a data message
    /// (no fragment or frame in flight then).
    pub peak_resting_capacity: usize,
}

impl Decoded {
    /// Payload bytes of everything yielded.
    pub fn yielded_bytes(&self) -> usize {
        self.messages
            .iter()
            .map(|m| match m {
                Message::Text(t) => t.len(),
                Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
                Message::Close(f) => f.as_ref().map_or(0, |f| 2 + f.reason.len()),
            })
            .sum()
    }
}

/// Decodes `input` as one client connection's bytes, in memory.
pub fn decode_client_bytes(input: &[u8], config: SocketConfig) -> Decoded {
    struct Memory<'a> {
        input: &'a [u8],
        written: Vec<u8>,
    }
    impl AsyncRead for Memory<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }
    impl AsyncWrite for Memory<'_> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    let mut socket = Socket::new(
        Memory {
            input,
            written: Vec::new(),
        },
        config,
    );
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut decoded = Decoded::default();
    // Memory never blocks, so every poll is ready; the bound only guards
    // against a parser that stops making progress.
    for _ in 0..=input.len() + 1 {
        match Pin::new(&mut socket).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(m))) => {
                if matches!(m, Message::Text(_) | Message::Binary(_)) {
                    decoded.peak_resting_capacity =
                        decoded.peak_resting_capacity.max(socket.buffer_capacity());
                }
                decoded.messages.push(m);
            }
            Poll::Ready(Some(Err(e))) => {
                match violation(&e) {
                    Some(v) => decoded.violation = Some(v),
                    None => decoded.other_error = Some(e.to_string()),
                }
                break;
            }
            Poll::Ready(None) => break,
            Poll::Pending => {
                decoded.other_error = Some("pending on memory input".into());
                break;
            }
        }
    }
    decoded.written = std::mem::take(&mut socket.io.written);
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::{self, protocol::Role};

    const CONFIG: SocketConfig = SocketConfig {
        read_buffer_bytes: 1024,
        max_frame_bytes: 64 * 1024,
        max_message_bytes: 64 * 1024,
    };

    /// A server socket and a real (tungstenite) client on a pipe.
    async fn pair() -> (
        Socket<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        // A small pipe, so large frames need many partial reads and writes.
        let (server_io, client_io) = tokio::io::duplex(4096);
        let client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        (Socket::new(server_io, CONFIG), client)
    }

    fn text(i: usize, len: usize) -> String {
        let mut s = format!("{i:06}:");
        s.push_str(&"x".repeat(len.saturating_sub(s.len())));
        s
    }

    #[tokio::test]
    async fn large_and_small_frames_cross_both_ways_in_order_and_leave_nothing_held() {
        let (mut server, mut client) = pair().await;
        let sizes = [10, 60_000, 5, 1024, 1025, 65_536, 0, 125, 126, 65_535, 300];
        let expected: Vec<String> = sizes.iter().enumerate().map(|(i, &n)| text(i, n)).collect();
        let to_send = expected.clone();
        let client_side = tokio::spawn(async move {
            for t in &to_send {
                client
                    .send(tungstenite::Message::text(t.clone()))
                    .await
                    .unwrap();
            }
            let mut got = Vec::new();
            while got.len() < to_send.len() {
                match client.next().await.unwrap().unwrap() {
                    tungstenite::Message::Text(t) => got.push(t.to_string()),
                    other => panic!("unexpected {other:?}"),
                }
            }
            (client, got)
        });
        let mut received = Vec::new();
        for _ in 0..expected.len() {
            match server.next().await.unwrap().unwrap() {
                Message::Text(t) => received.push(t.to_string()),
                other => panic!("unexpected {other:?}"),
            }
            assert_eq!(
                server.spare_heap_bytes(),
                0,
                "after {} frames",
                received.len()
            );
        }
        assert_eq!(
            received, expected,
            "client to server: none lost or reordered"
        );
        for t in &expected {
            server.send(Message::Text(t.clone().into())).await.unwrap();
            assert_eq!(server.spare_heap_bytes(), 0, "nothing kept after a write");
        }
        let (_client, echoed) = client_side.await.unwrap();
        assert_eq!(echoed, expected, "server to client: none lost or reordered");
    }

    #[tokio::test]
    async fn pings_are_answered_and_a_close_is_echoed() {
        let (mut server, mut client) = pair().await;
        client
            .send(tungstenite::Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Message::Ping(Bytes::from_static(b"hi"))
        );
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            tungstenite::Message::Pong(Bytes::from_static(b"hi"))
        );
        client
            .close(Some(tungstenite::protocol::CloseFrame {
                code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await
            .unwrap();
        assert!(matches!(
            server.next().await.unwrap().unwrap(),
            Message::Close(Some(CloseFrame { code: 1000, reason })) if reason == "bye"
        ));
        assert!(
            server.next().await.is_none(),
            "the stream ends after a close"
        );
        // The client sees the echo and completes the closing handshake.
        loop {
            match client.next().await {
                Some(Ok(tungstenite::Message::Close(_))) | None => break,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("{e}"),
            }
        }
    }

    /// One client frame as bytes: `b0` is FIN|RSV|opcode, masked with a
    /// non-zero key unless `masked` is false.
    fn frame(b0: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
        let key = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut out = vec![b0];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    /// The bytes `input` (written by a task, so large inputs do not block),
    /// what the socket yields from them until it ends or errs, and what it
    /// wrote back.
    async fn feed(input: Vec<u8>) -> (Vec<Message>, Option<Violation>, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (server_io, raw) = tokio::io::duplex(4096);
        let (mut raw_read, mut raw_write) = tokio::io::split(raw);
        let writer = tokio::spawn(async move {
            // The server may stop reading mid-input: a failed write is fine.
            let _ = raw_write.write_all(&input).await;
            raw_write
        });
        let mut server = Socket::new(server_io, CONFIG);
        let mut messages = Vec::new();
        let mut violated = None;
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(5), server.next())
                .await
                .expect("the socket answers every input")
            {
                Some(Ok(m)) => messages.push(m),
                Some(Err(e)) => {
                    violated = Some(violation(&e).expect("a violation, not an IO error"));
                    break;
                }
                None => break,
            }
        }
        // What the connection loop does with a violation (`read_error`).
        if let Some(v) = violated {
            server
                .send(Message::Close(Some(CloseFrame {
                    code: v.code,
                    reason: v.reason.into(),
                })))
                .await
                .unwrap();
        }
        drop(server);
        let _keep_open = writer.await.unwrap();
        let mut written = Vec::new();
        raw_read.read_to_end(&mut written).await.unwrap();
        (messages, violated, written)
    }

    /// The close code of the first close frame in `written` (server frames
    /// are unmasked), if there is one.
    fn close_code_on_wire(written: &[u8]) -> Option<u16> {
        let mut at = 0;
        while at + 2 <= written.len() {
            let (op, len) = (written[at] & 0x0F, (written[at + 1] & 0x7F) as usize);
            // Control frames and the small frames of these tests only.
            assert!(len < 126, "unexpected large frame in the answer");
            if op == OP_CLOSE {
                return (len >= 2).then(|| u16::from_be_bytes([written[at + 2], written[at + 3]]));
            }
            at += 2 + len;
        }
        None
    }

    #[tokio::test]
    async fn every_protocol_violation_is_closed_with_its_code() {
        let p = close::PROTOCOL_ERROR;
        let mut cases: Vec<(String, Vec<u8>, u16)> = vec![
            ("unmasked text".into(), frame(0x81, false, b"x"), p),
            ("RSV1 set".into(), frame(0xC1, true, b"x"), p),
            ("RSV2 set".into(), frame(0xA1, true, b"x"), p),
            ("RSV3 set".into(), frame(0x91, true, b"x"), p),
            ("data opcode 3".into(), frame(0x83, true, b"x"), p),
            ("control opcode 0xB".into(), frame(0x8B, true, b""), p),
            ("ping of 126 bytes".into(), frame(0x89, true, &[0; 126]), p),
            ("fragmented ping".into(), frame(0x09, true, b"x"), p),
            (
                "fragmented close".into(),
                frame(0x08, true, &close_payload(1000, b"")),
                p,
            ),
            ("continuation first".into(), frame(0x80, true, b"x"), p),
            (
                "text during a fragmented text".into(),
                [frame(0x01, true, b"a"), frame(0x81, true, b"b")].concat(),
                p,
            ),
            (
                "binary during a fragmented binary".into(),
                [frame(0x02, true, b"a"), frame(0x82, true, b"b")].concat(),
                p,
            ),
            ("one-byte close payload".into(), frame(0x88, true, &[3]), p),
            (
                "64-bit length with the top bit set".into(),
                vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                p,
            ),
            (
                "invalid UTF-8 text".into(),
                frame(0x81, true, b"ok \xff"),
                close::INVALID_PAYLOAD,
            ),
            (
                "invalid UTF-8 across fragments".into(),
                // "€" is E2 82 AC: the second fragment breaks it.
                [frame(0x01, true, b"\xe2\x82"), frame(0x80, true, b"(")].concat(),
                close::INVALID_PAYLOAD,
            ),
            (
                "truncated UTF-8 at the end of the message".into(),
                [frame(0x01, true, b"a"), frame(0x80, true, b"\xe2\x82")].concat(),
                close::INVALID_PAYLOAD,
            ),
            (
                "invalid UTF-8 close reason".into(),
                frame(0x88, true, &close_payload(1000, b"\xc3\x28")),
                close::INVALID_PAYLOAD,
            ),
            (
                // Only the header: refused before the payload is read or
                // allocated.
                "frame over max_frame_bytes".into(),
                vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0],
                close::TOO_LARGE,
            ),
            (
                "fragments over max_message_bytes".into(),
                [
                    frame(0x02, true, &vec![7; 40_000]),
                    frame(0x80, true, &vec![7; 40_000]),
                ]
                .concat(),
                close::TOO_LARGE,
            ),
        ];
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            cases.push((
                format!("close code {code}"),
                frame(0x88, true, &close_payload(code, b"")),
                p,
            ));
        }
        for (name, input, code) in cases {
            let (_, violated, written) = feed(input).await;
            assert_eq!(violated.map(|v| v.code), Some(code), "{name}");
            assert_eq!(
                close_code_on_wire(&written),
                Some(code),
                "{name}: on the wire"
            );
        }
    }

    #[tokio::test]
    async fn valid_input_is_yielded_pinged_pongs_and_closes_are_echoed() {
        // Fragmented text with "€" split across fragments and a ping between
        // the fragments (control frames may interleave).
        let input = [
            frame(0x01, true, b"price \xe2"),
            frame(0x89, true, b"p1"),
            frame(0x00, true, b"\x82"),
            frame(0x80, true, b"\xac"),
            frame(0x82, true, &[1, 2, 3]),
            frame(0x8A, true, b"unsolicited pong"),
            frame(0x88, true, &close_payload(4000, "fertig ✓".as_bytes())),
            // Anything after the close is not read.
            frame(0x81, true, b"after close"),
        ]
        .concat();
        let (messages, violated, written) = feed(input).await;
        assert_eq!(violated, None);
        assert_eq!(
            messages,
            vec![
                Message::Ping(Bytes::from_static(b"p1")),
                Message::Text("price €".into()),
                Message::Binary(Bytes::from_static(&[1, 2, 3])),
                Message::Pong(Bytes::from_static(b"unsolicited pong")),
                Message::Close(Some(CloseFrame {
                    code: 4000,
                    reason: "fertig ✓".into()
                })),
            ]
        );
        // A pong with the ping's payload, then the close echoing its code.
        assert_eq!(
            written,
            [vec![0x8A, 2, b'p', b'1'], vec![0x88, 2, 0x0F, 0xA0]].concat()
        );
        for code in [1000u16, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4999] {
            let (messages, violated, written) =
                feed(frame(0x88, true, &close_payload(code, b""))).await;
            assert_eq!(violated, None, "close code {code} is allowed");
            assert!(matches!(&messages[..], [Message::Close(Some(f))] if f.code == code));
            assert_eq!(close_code_on_wire(&written), Some(code), "echoed");
        }
        // An empty close is echoed empty.
        let (_, _, written) = feed(frame(0x88, true, b"")).await;
        assert_eq!(written, vec![0x88, 0]);
    }

    #[tokio::test]
    async fn buffers_return_to_the_configured_size_after_a_60_kb_frame_each_way() {
        let (mut server, mut client) = pair().await;
        assert_eq!(server.buffer_capacity(), CONFIG.read_buffer_bytes);
        let big = text(0, 60_000);
        let sent = big.clone();
        let client_side = tokio::spawn(async move {
            client.send(tungstenite::Message::text(sent)).await.unwrap();
            match client.next().await.unwrap().unwrap() {
                tungstenite::Message::Text(t) => t.len(),
                other => panic!("unexpected {other:?}"),
            }
        });
        let received = server.next().await.unwrap().unwrap();
        assert_eq!(received, Message::Text(big.clone().into()));
        drop(received);
        assert_eq!(
            server.buffer_capacity(),
            CONFIG.read_buffer_bytes,
            "after a 60 KB incoming frame"
        );
        server.send(Message::Text(big.into())).await.unwrap();
        assert_eq!(
            server.buffer_capacity(),
            CONFIG.read_buffer_bytes,
            "after a 60 KB outgoing frame"
        );
        assert_eq!(client_side.await.unwrap(), 60_000);
    }
}
