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
//! does not know which socket it drives; errors wrap tungstenite's error
//! type, so an oversize frame is still `Capacity` (closed 1009).
//!
//! Behaviour kept from tungstenite: a received ping is answered with a pong
//! (the ping is still yielded); a received close is answered with a close
//! echoing its code, yielded, and then the stream ends; text must be UTF-8;
//! client frames must be masked; no extensions (reserved bits set is an error).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};

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

fn protocol(e: ProtocolError) -> axum::Error {
    axum::Error::new(WsError::Protocol(e))
}

fn io_error(e: io::Error) -> axum::Error {
    axum::Error::new(WsError::Io(e))
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
                (u64::from_be_bytes(b), 10)
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
            return Err(protocol(ProtocolError::NonZeroReservedBits));
        }
        if h.mask.is_none() {
            return Err(protocol(ProtocolError::UnmaskedFrameFromClient));
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin {
                    return Err(protocol(ProtocolError::FragmentedControlFrame));
                }
                if h.len > 125 {
                    return Err(protocol(ProtocolError::ControlFrameTooBig));
                }
            }
            OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                let so_far = self.fragments.as_ref().map_or(0, |(_, f)| f.len());
                if h.len > self.config.max_frame_bytes
                    || so_far.saturating_add(h.len) > self.config.max_message_bytes
                {
                    return Err(axum::Error::new(WsError::Capacity(
                        CapacityError::MessageTooLong {
                            size: so_far.saturating_add(h.len),
                            max_size: self
                                .config
                                .max_message_bytes
                                .min(self.config.max_frame_bytes),
                        },
                    )));
                }
            }
            other if other < 8 => return Err(protocol(ProtocolError::UnknownDataFrameType(other))),
            other => return Err(protocol(ProtocolError::UnknownControlFrameType(other))),
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

    /// Writes a pending automatic reply, if any.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(reply) = &mut self.reply {
            ready!(reply.poll_write(&mut self.io, cx))?;
            self.reply = None;
        }
        Poll::Ready(Ok(()))
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
                    1 => {
                        return Err(io_error(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "close frame with a one-byte payload",
                        )));
                    }
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        let reason = Utf8Bytes::try_from(payload.slice(2..))
                            .map_err(|e| axum::Error::new(WsError::Utf8(e.to_string())))?;
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
                    return Err(protocol(ProtocolError::UnexpectedContinueFrame));
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
                    return Err(protocol(ProtocolError::ExpectedFragment(
                        tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Continue,
                    )));
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
                .map_err(|e| axum::Error::new(WsError::Utf8(e.to_string())))
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
            // Answers go out while reading, as tungstenite does; a reply that
            // cannot be written yet waits for the next poll or send.
            if let Poll::Ready(Err(e)) = this.poll_reply(cx) {
                this.ended = true;
                return Poll::Ready(Some(Err(io_error(e))));
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
                    if let Poll::Ready(Err(e)) = this.poll_reply(cx) {
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
        ready!(this.poll_reply(cx)).map_err(io_error)?;
        if let Some(sending) = &mut this.sending {
            ready!(sending.poll_write(&mut this.io, cx)).map_err(io_error)?;
            this.sending = None;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Self::Error> {
        let this = self.get_mut();
        if this.sent_close {
            return Err(protocol(ProtocolError::SendAfterClosing));
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

    #[tokio::test]
    async fn fragments_are_joined_and_limits_hold() {
        use tokio::io::AsyncWriteExt;
        let (server_io, mut raw) = tokio::io::duplex(4096);
        let mut server = Socket::new(server_io, CONFIG);
        // "hel" + "lo" as a text frame and a continuation, masked with 0s.
        raw.write_all(&[0x01, 0x83, 0, 0, 0, 0, b'h', b'e', b'l'])
            .await
            .unwrap();
        raw.write_all(&[0x80, 0x82, 0, 0, 0, 0, b'l', b'o'])
            .await
            .unwrap();
        assert_eq!(
            server.next().await.unwrap().unwrap(),
            Message::Text("hello".into())
        );
        // A frame over --max-frame-bytes is a capacity error (closed 1009).
        raw.write_all(&[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0])
            .await
            .unwrap();
        let err = server.next().await.unwrap().unwrap_err();
        assert!(matches!(
            err.into_inner().downcast_ref::<WsError>(),
            Some(WsError::Capacity(_))
        ));
        assert!(server.next().await.is_none());
    }

    #[tokio::test]
    async fn unmasked_and_reserved_frames_are_refused() {
        use tokio::io::AsyncWriteExt;
        for frame in [&[0x81u8, 0x01, b'x'][..], &[0xC1, 0x81, 0, 0, 0, 0, b'x']] {
            let (server_io, mut raw) = tokio::io::duplex(64);
            let mut server = Socket::new(server_io, CONFIG);
            raw.write_all(frame).await.unwrap();
            let err = server.next().await.unwrap().unwrap_err();
            assert!(
                matches!(
                    err.into_inner().downcast_ref::<WsError>(),
                    Some(WsError::Protocol(_))
                ),
                "{frame:?}"
            );
        }
    }
}
