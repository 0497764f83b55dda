#!/bin/sh
# Build the service's ffmpeg: static, with only what the conversion uses (WAV demuxer, PCM
# decoders, libmp3lame, the MP3 muxer, the pipe protocol for the WAV in, the file protocol for
# the MP3 out (a seekable file, so the muxer can go back and write the Xing/LAME length header),
# swresample and the filters ffmpeg's audio path needs), with no shared libraries: Debian's
# ffmpeg maps its many into every conversion's memory, this one none, and it encodes as fast
# (docs/performance.md, "Memory").
#
# Used by both the image (Dockerfile, stage "ffmpeg") and the native stack (devstack/src/devstack/native.py
# --install-tools, which keeps the result in .tools/ffmpeg/). It needs a C compiler, make, nasm,
# pkg-config and libmp3lame's static library (Debian: gcc libc6-dev make nasm pkg-config
# libmp3lame-dev).
#
# usage: build.sh SOURCE_DIR PREFIX   (installs PREFIX/bin/ffmpeg)
set -eu
src=$1
prefix=$2
cd "$src"
./configure \
    --prefix="$prefix" --enable-static --disable-shared --extra-ldflags=-static \
    --disable-everything --disable-autodetect --disable-doc --disable-debug \
    --disable-network --disable-ffplay --disable-ffprobe --disable-avdevice \
    --disable-swscale --disable-postproc \
    --enable-swresample --enable-libmp3lame --enable-encoder=libmp3lame \
    --enable-decoder=pcm_u8,pcm_s16le,pcm_s24le,pcm_s32le,pcm_f32le,pcm_f64le \
    --enable-demuxer=wav --enable-muxer=mp3 --enable-protocol=pipe,file \
    --enable-filter=abuffer,abuffersink,aformat,anull,aresample,atrim
make -j"$(nproc)" ffmpeg
strip ffmpeg
./ffmpeg -hide_banner -encoders | grep -q libmp3lame
install -D -m 0755 ffmpeg "$prefix/bin/ffmpeg"
