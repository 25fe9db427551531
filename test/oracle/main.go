// Command oracle puts the reference eStargz implementation (the estargz package of
// containerd/stargz-snapshotter, v0.12.0 as Debian packages it) behind a small command line, so that
// strata's tests can check blobs against it: what the reference builds, strata must read; what strata
// builds, the reference must read. It is a test tool of the strata repository, not part of the product.
//
//	oracle build  IN.tar OUT.blob [--chunk-size N] [--prioritized A,B] [--prioritized-file LIST]
//	              [--gzip-level N] [--zstdchunked] [--legacy-footer] [--gomaxprocs N]
//	oracle verify BLOB [--toc-digest D] [-q]
//	oracle cat    BLOB PATH [--offset N] [--length N] [--toc-digest D]
//	oracle toc    BLOB
//	oracle unpack BLOB OUT.tar
//
// Exit status: 0 done, 1 failed (an error, or a check that did not pass), 2 bad command line.
package main

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

const usage = `usage:
  oracle build  IN.tar OUT.blob [--chunk-size N] [--prioritized A,B] [--prioritized-file LIST]
                [--gzip-level N] [--zstdchunked] [--legacy-footer] [--gomaxprocs N]
  oracle verify BLOB [--toc-digest sha256:...] [-q]
  oracle cat    BLOB PATH [--offset N] [--length N] [--toc-digest sha256:...]
  oracle toc    BLOB
  oracle unpack BLOB OUT.tar
`

// badUsage marks an error in the command line (exit status 2).
type badUsage string

func (b badUsage) Error() string { return string(b) }

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	commands := map[string]func([]string) error{
		"build": build, "verify": verify, "cat": cat, "toc": printTOC, "unpack": unpack,
	}
	name := os.Args[1]
	if name == "help" || name == "-h" || name == "--help" {
		fmt.Print(usage)
		fmt.Printf("estargz v0.12.0 (Debian golang-github-containerd-stargz-snapshotter-dev), %s\n", runtime.Version())
		return
	}
	run, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "oracle: unknown command %q\n%s", name, usage)
		os.Exit(2)
	}
	if err := run(os.Args[2:]); err != nil {
		var u badUsage
		if errors.As(err, &u) {
			fmt.Fprintf(os.Stderr, "oracle %s: %v\n%s", name, err, usage)
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "oracle %s: %v\n", name, err)
		os.Exit(1)
	}
}

// parse reads flags wherever they stand among the positional arguments and checks how many
// positional arguments there are.
func parse(fs *flag.FlagSet, args []string, want int, names string) ([]string, error) {
	fs.SetOutput(io.Discard)
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, badUsage(err.Error())
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) != want {
		return nil, badUsage(fmt.Sprintf("%s needs %s, got %q", fs.Name(), names, positional))
	}
	return positional, nil
}

// ---------------------------------------------------------------------------------------------------
// Where the TOC is: the three footers the reference knows, tried in the order estargz.Open tries them.

type tocDecompressor interface {
	estargz.Decompressor
	DecompressTOC(io.Reader) (io.ReadCloser, error)
}

type footerKind struct {
	format string
	dec    tocDecompressor
}

var footerKinds = []footerKind{
	{"estargz (gzip, 51-byte footer)", &estargz.GzipDecompressor{}},
	{"legacy stargz (gzip, 47-byte footer)", &estargz.LegacyGzipDecompressor{}},
	{"zstd:chunked (zstd, 40-byte footer)", &zstdchunked.Decompressor{}},
}

type located struct {
	footerKind
	footerSize int64
	tocOffset  int64
	tocSize    int64
	tocJSON    []byte // the decompressed TOC, byte for byte: its sha256 is the TOC digest
}

func locate(sr *io.SectionReader) (*located, error) {
	var why []string
	for _, k := range footerKinds {
		l, err := tryFooter(sr, k)
		if err == nil {
			return l, nil
		}
		why = append(why, fmt.Sprintf("%s: %v", k.format, err))
	}
	return nil, fmt.Errorf("no footer the reference knows: %s", strings.Join(why, "; "))
}

func tryFooter(sr *io.SectionReader, k footerKind) (l *located, err error) {
	defer func() { // the library indexes into footers without checking their length
		if p := recover(); p != nil {
			err = fmt.Errorf("footer parser panicked: %v", p)
		}
	}()
	n := k.dec.FooterSize()
	if sr.Size() < n {
		return nil, fmt.Errorf("blob of %d bytes is shorter than the footer", sr.Size())
	}
	tail := make([]byte, n)
	if _, err := sr.ReadAt(tail, sr.Size()-n); err != nil {
		return nil, err
	}
	_, off, size, err := k.dec.ParseFooter(tail)
	if err != nil {
		return nil, err
	}
	if size <= 0 {
		size = sr.Size() - n - off
	}
	if off <= 0 || size <= 0 || off+size > sr.Size()-n {
		return nil, fmt.Errorf("TOC at %d+%d lies outside the blob of %d bytes", off, size, sr.Size())
	}
	rc, err := k.dec.DecompressTOC(io.NewSectionReader(sr, off, size))
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	js, err := io.ReadAll(rc)
	if err != nil {
		return nil, fmt.Errorf("decompressing the TOC: %w", err)
	}
	return &located{footerKind: k, footerSize: n, tocOffset: off, tocSize: size, tocJSON: js}, nil
}

func openFile(p string) (*os.File, *io.SectionReader, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return f, io.NewSectionReader(f, 0, st.Size()), nil
}

// openReference opens the blob with estargz.Open, as the snapshotter does (zstd:chunked included).
func openReference(sr *io.SectionReader) (*estargz.Reader, error) {
	r, err := estargz.Open(sr, estargz.WithDecompressors(&zstdchunked.Decompressor{}))
	if err != nil {
		return nil, fmt.Errorf("estargz.Open: %w", err)
	}
	return r, nil
}

// uncompressed digests and counts the whole decompressed stream (payload, TOC, footer): the DiffID.
func uncompressed(dec estargz.Decompressor, sr *io.SectionReader) (digest.Digest, int64, error) {
	rc, err := dec.Reader(io.NewSectionReader(sr, 0, sr.Size()))
	if err != nil {
		return "", 0, err
	}
	defer rc.Close()
	d := digest.Canonical.Digester()
	n, err := io.Copy(d.Hash(), rc)
	return d.Digest(), n, err
}

func fileDigest(sr *io.SectionReader) (digest.Digest, error) {
	return digest.Canonical.FromReader(io.NewSectionReader(sr, 0, sr.Size()))
}

// ---------------------------------------------------------------------------------------------------
// build

// zstdCompression is the Compression estargz.Build needs, made of zstdchunked's two halves.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

func build(args []string) error {
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	chunkSize := fs.Int("chunk-size", 0, "")
	prioritized := fs.String("prioritized", "", "")
	prioritizedFile := fs.String("prioritized-file", "", "")
	gzipLevel := fs.Int("gzip-level", gzip.BestCompression, "")
	zstdChunked := fs.Bool("zstdchunked", false, "")
	legacy := fs.Bool("legacy-footer", false, "")
	procs := fs.Int("gomaxprocs", 1, "")
	pos, err := parse(fs, args, 2, "IN.tar OUT.blob")
	if err != nil {
		return err
	}
	switch {
	case *chunkSize < 0:
		return badUsage("--chunk-size must not be negative")
	case *gzipLevel < gzip.HuffmanOnly || *gzipLevel > gzip.BestCompression:
		return badUsage("--gzip-level must be in -2..9")
	case *zstdChunked && *legacy:
		return badUsage("--legacy-footer is a gzip footer; it does not go with --zstdchunked")
	case *procs < 0:
		return badUsage("--gomaxprocs must not be negative")
	}
	// Build splits the layer into GOMAXPROCS sub-blobs, so the bytes depend on it: pin it.
	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}

	var prio []string
	for _, p := range strings.Split(*prioritized, ",") {
		if p = strings.TrimSpace(p); p != "" {
			prio = append(prio, p)
		}
	}
	if *prioritizedFile != "" {
		list, err := os.ReadFile(*prioritizedFile)
		if err != nil {
			return err
		}
		for _, p := range strings.Split(string(list), "\n") {
			if p = strings.TrimSpace(p); p != "" {
				prio = append(prio, p)
			}
		}
	}

	in, inSR, err := openFile(pos[0])
	if err != nil {
		return err
	}
	defer in.Close()

	opts := []estargz.Option{estargz.WithChunkSize(*chunkSize), estargz.WithCompressionLevel(*gzipLevel)}
	if len(prio) > 0 {
		opts = append(opts, estargz.WithPrioritizedFiles(prio))
	}
	var zstdMeta map[string]string
	if *zstdChunked {
		zstdMeta = map[string]string{}
		opts = append(opts, estargz.WithCompression(zstdCompression{
			&zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault, Metadata: zstdMeta},
			&zstdchunked.Decompressor{},
		}))
	}
	blob, err := estargz.Build(inSR, opts...)
	if err != nil {
		return fmt.Errorf("estargz.Build: %w", err)
	}

	// Write next to OUT and rename, so that OUT is whole or absent.
	out := pos[1]
	tmp, err := os.CreateTemp(filepath.Dir(out), ".oracle-*")
	if err != nil {
		blob.Close()
		return err
	}
	keep := false
	defer func() {
		if !keep {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	_, copyErr := io.Copy(tmp, blob)
	if err := blob.Close(); copyErr == nil && err != nil {
		copyErr = err
	}
	if copyErr != nil {
		return fmt.Errorf("writing the blob: %w", copyErr)
	}
	if *legacy {
		if err := toLegacyFooter(tmp); err != nil {
			return err
		}
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return err
	}
	keep = true

	// Read back what was written: its footer, digests and size, as verify would find them.
	f, sr, err := openFile(out)
	if err != nil {
		return err
	}
	defer f.Close()
	loc, err := locate(sr)
	if err != nil {
		return fmt.Errorf("the written blob: %w", err)
	}
	if got := digest.FromBytes(loc.tocJSON); got != blob.TOCDigest() {
		return fmt.Errorf("the written TOC has digest %s, Build reported %s", got, blob.TOCDigest())
	}
	diffID, usize, err := uncompressed(loc.dec, sr)
	if err != nil {
		return fmt.Errorf("decompressing the written blob: %w", err)
	}
	if diffID != blob.DiffID() {
		return fmt.Errorf("the written blob decompresses to %s, Build reported DiffID %s", diffID, blob.DiffID())
	}
	blobDigest, err := fileDigest(sr)
	if err != nil {
		return err
	}

	fmt.Printf("format: %s\n", loc.format)
	fmt.Printf("output: %s\n", out)
	fmt.Printf("blob-size: %d\n", sr.Size())
	fmt.Printf("blob-digest: %s\n", blobDigest)
	fmt.Printf("toc-digest: %s\n", blob.TOCDigest())
	fmt.Printf("diff-id: %s\n", diffID)
	fmt.Printf("uncompressed-size: %d\n", usize)
	fmt.Printf("toc-offset: %d (0x%x)\n", loc.tocOffset, loc.tocOffset)
	fmt.Printf("footer-size: %d\n", loc.footerSize)
	fmt.Printf("gomaxprocs: %d\n", runtime.GOMAXPROCS(0))
	fmt.Printf("prioritized: %d\n", len(prio))
	fmt.Printf("annotation: %s=%s\n", estargz.TOCJSONDigestAnnotation, blob.TOCDigest())
	fmt.Printf("annotation: %s=%d\n", estargz.StoreUncompressedSizeAnnotation, usize)
	keys := make([]string, 0, len(zstdMeta))
	for k := range zstdMeta {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Printf("annotation: %s=%s\n", k, zstdMeta[k])
	}
	return nil
}

// toLegacyFooter swaps the 51-byte eStargz footer at the end of f for the 47-byte footer of the
// original stargz format (google/crfs): an empty stored gzip member whose Extra field is the bare
// "<16 hex digits of the TOC offset>STARGZ", without eStargz's RFC 1952 subfield header. The
// library reads this footer but never writes it.
func toLegacyFooter(f *os.File) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	end := st.Size() - estargz.FooterSize
	if end < 0 {
		return fmt.Errorf("blob too short for a footer")
	}
	footer := make([]byte, estargz.FooterSize)
	if _, err := f.ReadAt(footer, end); err != nil {
		return err
	}
	_, tocOffset, _, err := (&estargz.GzipDecompressor{}).ParseFooter(footer)
	if err != nil {
		return fmt.Errorf("reading the eStargz footer: %w", err)
	}
	var b bytes.Buffer
	zw, err := gzip.NewWriterLevel(&b, gzip.NoCompression)
	if err != nil {
		return err
	}
	zw.Extra = []byte(fmt.Sprintf("%016xSTARGZ", tocOffset))
	if err := zw.Close(); err != nil {
		return err
	}
	if b.Len() != 47 {
		return fmt.Errorf("legacy footer came out %d bytes long, not 47", b.Len())
	}
	if err := f.Truncate(end); err != nil {
		return err
	}
	_, err = f.WriteAt(b.Bytes(), end)
	return err
}

// ---------------------------------------------------------------------------------------------------
// verify

type problems []string

func (p *problems) add(format string, a ...interface{}) {
	*p = append(*p, fmt.Sprintf(format, a...))
}

func verify(args []string) error {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	want := fs.String("toc-digest", "", "")
	quiet := fs.Bool("q", false, "")
	pos, err := parse(fs, args, 1, "BLOB")
	if err != nil {
		return err
	}
	f, sr, err := openFile(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	loc, err := locate(sr)
	if err != nil {
		return err
	}
	r, err := openReference(sr)
	if err != nil {
		return err
	}
	var bad problems

	// 1. The TOC: its digest, and the library's verifiers for every chunk.
	tocDigest := r.TOCDigest()
	if raw := digest.FromBytes(loc.tocJSON); raw != tocDigest {
		bad.add("the TOC bytes hash to %s, the library says %s", raw, tocDigest)
	}
	if *want != "" && *want != tocDigest.String() {
		bad.add("TOC digest is %s, expected %s", tocDigest, *want)
	}
	verifiers, err := r.Verifiers()
	if err != nil {
		bad.add("chunk verifiers: %v", err)
	}
	var toc estargz.JTOC // our own copy, with the names as written
	if err := json.Unmarshal(loc.tocJSON, &toc); err != nil {
		return fmt.Errorf("TOC JSON: %w", err)
	}
	if toc.Version != 1 {
		bad.add("TOC version %d, want 1", toc.Version)
	}

	// 2. The TOC's shape: known types, chunks that tile each file, payload offsets, one landmark.
	files := groupFiles(loc, &toc, &bad)
	landmark := "none"
	counts := map[string]int{}
	last := map[string]int{} // clean name -> index of its last non-chunk entry
	multi := 0
	for i, e := range toc.Entries {
		counts[e.Type]++
		if e.Type == "chunk" {
			continue
		}
		name := clean(e.Name)
		last[name] = i
		if name == estargz.PrefetchLandmark || name == estargz.NoPrefetchLandmark {
			if landmark != "none" {
				bad.add("entry %d: a second landmark %s", i, name)
			}
			landmark = fmt.Sprintf("%s at entry %d", name, i)
		}
		if e.Type == "hardlink" {
			if _, ok := last[clean(e.LinkName)]; !ok {
				bad.add("entry %d %q: hardlink to %q, which no earlier entry is", i, e.Name, e.LinkName)
			}
		}
	}
	for _, fc := range files {
		if len(fc.chunks) > 1 {
			multi++
		}
	}

	// 3. Random access: every chunk of every reachable file through Reader.OpenFile, each checked
	// against its chunk digest, each file against its file digest.
	var chunksOK, filesOK int
	var readBytes int64
	for _, fc := range files {
		if fc.entry.Size == 0 || last[clean(fc.entry.Name)] != fc.index {
			continue // empty, or shadowed by a later entry of the same name
		}
		name := clean(fc.entry.Name)
		fr, err := r.OpenFile(name)
		if err != nil {
			bad.add("OpenFile %q: %v", name, err)
			continue
		}
		whole := sha256.New()
		ok := true
		for _, c := range fc.chunks {
			buf := make([]byte, c.size)
			if n, err := fr.ReadAt(buf, c.fileOffset); n != len(buf) {
				bad.add("%q: reading [%d,+%d): %v", name, c.fileOffset, c.size, err)
				ok = false
				break
			}
			readBytes += c.size
			whole.Write(buf)
			if verifiers == nil {
				continue
			}
			v, err := verifiers.Verifier(c.entry)
			if err != nil {
				bad.add("%q chunk at %d: %v", name, c.fileOffset, err)
				ok = false
				continue
			}
			v.Write(buf)
			if !v.Verified() {
				bad.add("%q chunk [%d,+%d) at blob offset %d does not match its digest", name, c.fileOffset, c.size, c.entry.Offset)
				ok = false
				continue
			}
			chunksOK++
		}
		if !ok {
			continue
		}
		if got := "sha256:" + hex.EncodeToString(whole.Sum(nil)); fc.entry.Digest != "" && got != fc.entry.Digest {
			bad.add("%q: contents hash to %s, the TOC says %s", name, got, fc.entry.Digest)
			continue
		}
		if fc.entry.Digest == "" && verifiers == nil {
			bad.add("%q: no digest to check it against", name)
			continue
		}
		if !*quiet {
			fmt.Printf("file\t%s\t%d bytes\t%d chunk(s)\tok\n", name, fc.entry.Size, len(fc.chunks))
		}
		filesOK++
	}

	// 4. The stream: the tar inside the payload has the TOC's entries, in order, with its metadata.
	matched := compareStream(sr, loc, &toc, files, &bad)
	diffID, usize, err := uncompressed(loc.dec, sr)
	if err != nil {
		bad.add("decompressing the whole blob: %v", err)
	}
	blobDigest, err := fileDigest(sr)
	if err != nil {
		return err
	}

	var kinds []string
	for t, n := range counts {
		kinds = append(kinds, fmt.Sprintf("%s=%d", t, n))
	}
	sort.Strings(kinds)
	fmt.Printf("format: %s\n", loc.format)
	fmt.Printf("blob-size: %d\n", sr.Size())
	fmt.Printf("blob-digest: %s\n", blobDigest)
	fmt.Printf("footer-size: %d\n", loc.footerSize)
	fmt.Printf("toc-offset: %d (0x%x)\n", loc.tocOffset, loc.tocOffset)
	fmt.Printf("toc-json-size: %d\n", len(loc.tocJSON))
	fmt.Printf("toc-digest: %s\n", tocDigest)
	fmt.Printf("diff-id: %s\n", diffID)
	fmt.Printf("uncompressed-size: %d\n", usize)
	fmt.Printf("entries: %d (%s)\n", len(toc.Entries), strings.Join(kinds, " "))
	fmt.Printf("multi-chunk-files: %d\n", multi)
	fmt.Printf("prefetch-landmark: %s\n", landmark)
	fmt.Printf("verified-chunks: %d\n", chunksOK)
	fmt.Printf("verified-files: %d (%d bytes read by random access)\n", filesOK, readBytes)
	fmt.Printf("stream-entries-matched: %d\n", matched)
	for _, p := range bad {
		fmt.Fprintf(os.Stderr, "FAIL %s\n", p)
	}
	if len(bad) > 0 {
		fmt.Printf("result: FAILED (%d)\n", len(bad))
		return fmt.Errorf("%d check(s) failed, the first: %s", len(bad), bad[0])
	}
	fmt.Printf("result: OK\n")
	return nil
}

func clean(name string) string { return strings.TrimPrefix(path.Clean("/"+name), "/") }

type chunk struct {
	entry      *estargz.TOCEntry // the reg or chunk entry that holds it
	fileOffset int64
	size       int64
}

type fileChunks struct {
	index  int // of the reg entry in the TOC
	entry  *estargz.TOCEntry
	chunks []chunk
}

// groupFiles pairs each reg entry with the chunk entries after it, and checks that they tile the
// file from 0 to its size with data inside the payload.
func groupFiles(loc *located, toc *estargz.JTOC, bad *problems) []*fileChunks {
	var files []*fileChunks
	var cur *fileChunks
	for i, e := range toc.Entries {
		switch e.Type {
		case "reg":
			cur = &fileChunks{index: i, entry: e}
			files = append(files, cur)
		case "chunk":
			if cur == nil {
				bad.add("entry %d: a chunk that follows no regular file", i)
				continue
			}
			if e.Name != "" && clean(e.Name) != clean(cur.entry.Name) {
				bad.add("entry %d: chunk named %q inside %q", i, e.Name, cur.entry.Name)
			}
		case "dir", "symlink", "hardlink", "char", "block", "fifo":
			cur = nil
			continue
		default:
			bad.add("entry %d %q: unknown type %q", i, e.Name, e.Type)
			cur = nil
			continue
		}
		if cur.entry.Size == 0 {
			continue
		}
		size := e.ChunkSize
		if size == 0 {
			size = cur.entry.Size - e.ChunkOffset
		}
		var next int64
		if n := len(cur.chunks); n > 0 {
			next = cur.chunks[n-1].fileOffset + cur.chunks[n-1].size
		}
		if e.ChunkOffset != next || size <= 0 || e.ChunkOffset+size > cur.entry.Size {
			bad.add("entry %d (%q): chunk [%d,+%d) where [%d,...) of %d bytes was due", i, cur.entry.Name, e.ChunkOffset, size, next, cur.entry.Size)
		}
		if e.Offset <= 0 || e.Offset >= loc.tocOffset {
			bad.add("entry %d (%q): data offset %d is outside the payload [1,%d)", i, cur.entry.Name, e.Offset, loc.tocOffset)
		}
		cur.chunks = append(cur.chunks, chunk{entry: e, fileOffset: e.ChunkOffset, size: size})
	}
	for _, fc := range files {
		var covered int64
		if n := len(fc.chunks); n > 0 {
			covered = fc.chunks[n-1].fileOffset + fc.chunks[n-1].size
		}
		if covered != fc.entry.Size {
			bad.add("%q: chunks cover %d of its %d bytes", fc.entry.Name, covered, fc.entry.Size)
		}
	}
	return files
}

// compareStream reads the payload as one tar (estargz.Unpack) and checks each member against the
// TOC's non-chunk entries in order, and each file's bytes against its chunk and file digests.
func compareStream(sr *io.SectionReader, loc *located, toc *estargz.JTOC, files []*fileChunks, bad *problems) int {
	rc, err := estargz.Unpack(io.NewSectionReader(sr, 0, sr.Size()), loc.dec)
	if err != nil {
		bad.add("estargz.Unpack: %v", err)
		return 0
	}
	defer rc.Close()
	chunksOf := map[*estargz.TOCEntry][]chunk{}
	for _, fc := range files {
		chunksOf[fc.entry] = fc.chunks
	}
	var entries []*estargz.TOCEntry
	for _, e := range toc.Entries {
		if e.Type != "chunk" {
			entries = append(entries, e)
		}
	}
	tr := tar.NewReader(bufio.NewReaderSize(rc, 1<<20))
	matched, i := 0, 0
	for ; ; i++ {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			bad.add("payload tar, member %d: %v", i, err)
			return matched
		}
		if i >= len(entries) {
			bad.add("payload tar member %q is not in the TOC", h.Name)
			continue
		}
		e := entries[i]
		before := len(*bad)
		differ := func(field string, tarValue, tocValue interface{}) {
			if fmt.Sprint(tarValue) != fmt.Sprint(tocValue) {
				bad.add("%q: %s is %v in the tar, %v in the TOC", h.Name, field, tarValue, tocValue)
			}
		}
		differ("name", h.Name, e.Name)
		differ("type", tarType(h.Typeflag), e.Type)
		differ("mode", h.Mode, e.Mode)
		differ("uid", h.Uid, e.UID)
		differ("gid", h.Gid, e.GID)
		differ("modtime", tocTime(h.ModTime), e.ModTime3339)
		differ("xattrs", tarXattrs(h), xattrString(e.Xattrs))
		switch h.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
			differ("size", h.Size, e.Size)
		case tar.TypeLink, tar.TypeSymlink:
			differ("link", h.Linkname, e.LinkName)
		case tar.TypeChar, tar.TypeBlock:
			differ("device", fmt.Sprintf("%d,%d", h.Devmajor, h.Devminor), fmt.Sprintf("%d,%d", e.DevMajor, e.DevMinor))
		}
		if e.Type == "reg" && h.Size == e.Size && len(*bad) == before {
			whole := sha256.New()
			for _, c := range chunksOf[e] {
				d := sha256.New()
				if _, err := io.CopyN(io.MultiWriter(d, whole), tr, c.size); err != nil {
					bad.add("%q: reading the tar at %d: %v", h.Name, c.fileOffset, err)
					break
				}
				if got := "sha256:" + hex.EncodeToString(d.Sum(nil)); c.entry.ChunkDigest != "" && got != c.entry.ChunkDigest {
					bad.add("%q: chunk at %d in the tar hashes to %s, the TOC says %s", h.Name, c.fileOffset, got, c.entry.ChunkDigest)
				}
			}
			if got := "sha256:" + hex.EncodeToString(whole.Sum(nil)); e.Size > 0 && e.Digest != "" && got != e.Digest {
				bad.add("%q: contents in the tar hash to %s, the TOC says %s", h.Name, got, e.Digest)
			}
		}
		if len(*bad) == before {
			matched++
		}
	}
	if i < len(entries) {
		bad.add("the TOC has %d entries besides chunks, the payload tar %d members", len(entries), i)
	}
	return matched
}

func tarType(t byte) string {
	switch t {
	case tar.TypeReg, tar.TypeRegA:
		return "reg"
	case tar.TypeDir:
		return "dir"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeLink:
		return "hardlink"
	case tar.TypeChar:
		return "char"
	case tar.TypeBlock:
		return "block"
	case tar.TypeFifo:
		return "fifo"
	}
	return fmt.Sprintf("tar type %q", t)
}

// tocTime is how the TOC writes a modification time: RFC 3339 in UTC, whole seconds, and nothing at
// all for the zero time or the epoch.
func tocTime(t time.Time) string {
	if t.IsZero() || t.Unix() == 0 {
		return ""
	}
	return t.UTC().Round(time.Second).Format(time.RFC3339)
}

func tarXattrs(h *tar.Header) string {
	x := map[string][]byte{}
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			x[strings.TrimPrefix(k, "SCHILY.xattr.")] = []byte(v)
		}
	}
	return xattrString(x)
}

func xattrString(x map[string][]byte) string {
	keys := make([]string, 0, len(x))
	for k := range x {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s=%x;", k, x[k])
	}
	return b.String()
}

// ---------------------------------------------------------------------------------------------------
// cat, toc, unpack

// cat writes the bytes [offset, offset+length) of a regular file, read the way the snapshotter reads:
// whole chunks through Reader.OpenFile, each checked against its digest before any of it is written.
func cat(args []string) error {
	fs := flag.NewFlagSet("cat", flag.ContinueOnError)
	offset := fs.Int64("offset", 0, "")
	length := fs.Int64("length", -1, "")
	want := fs.String("toc-digest", "", "")
	pos, err := parse(fs, args, 2, "BLOB PATH")
	if err != nil {
		return err
	}
	if *offset < 0 {
		return badUsage("--offset must not be negative")
	}
	f, sr, err := openFile(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	r, err := openReference(sr)
	if err != nil {
		return err
	}
	expect := r.TOCDigest()
	if *want != "" {
		if expect, err = digest.Parse(*want); err != nil {
			return badUsage("--toc-digest: " + err.Error())
		}
	}
	verifiers, err := r.VerifyTOC(expect)
	if err != nil {
		return err
	}
	e, ok := r.Lookup(pos[1]) // a hardlink resolves to its target
	if !ok {
		return fmt.Errorf("%q is not in the TOC", pos[1])
	}
	if e.Type != "reg" {
		return fmt.Errorf("%q is a %s, not a regular file", pos[1], e.Type)
	}
	fr, err := r.OpenFile(e.Name)
	if err != nil {
		return err
	}
	start, end := *offset, e.Size
	if start > end {
		start = end
	}
	if *length >= 0 && start+*length < end {
		end = start + *length
	}
	w := bufio.NewWriterSize(os.Stdout, 1<<20)
	for at := start; at < end; {
		c, ok := r.ChunkEntryForOffset(e.Name, at)
		if !ok {
			return fmt.Errorf("%q: no chunk holds offset %d", e.Name, at)
		}
		buf := make([]byte, c.ChunkSize)
		if n, err := fr.ReadAt(buf, c.ChunkOffset); n != len(buf) {
			return fmt.Errorf("%q: reading [%d,+%d): %v", e.Name, c.ChunkOffset, c.ChunkSize, err)
		}
		v, err := verifiers.Verifier(c)
		if err != nil {
			return err
		}
		v.Write(buf)
		if !v.Verified() {
			return fmt.Errorf("%q: chunk [%d,+%d) does not match its digest", e.Name, c.ChunkOffset, c.ChunkSize)
		}
		stop := c.ChunkOffset + c.ChunkSize
		if stop > end {
			stop = end
		}
		if _, err := w.Write(buf[at-c.ChunkOffset : stop-c.ChunkOffset]); err != nil {
			return err
		}
		at = stop
	}
	return w.Flush()
}

// printTOC writes the decompressed TOC JSON exactly as stored; its sha256 is the TOC digest.
func printTOC(args []string) error {
	pos, err := parse(flag.NewFlagSet("toc", flag.ContinueOnError), args, 1, "BLOB")
	if err != nil {
		return err
	}
	f, sr, err := openFile(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	loc, err := locate(sr)
	if err != nil {
		return err
	}
	_, err = os.Stdout.Write(loc.tocJSON)
	return err
}

// unpack writes the payload as a plain tar (estargz.Unpack): what precedes the TOC, decompressed.
func unpack(args []string) error {
	pos, err := parse(flag.NewFlagSet("unpack", flag.ContinueOnError), args, 2, "BLOB OUT.tar")
	if err != nil {
		return err
	}
	f, sr, err := openFile(pos[0])
	if err != nil {
		return err
	}
	defer f.Close()
	loc, err := locate(sr)
	if err != nil {
		return err
	}
	rc, err := estargz.Unpack(sr, loc.dec)
	if err != nil {
		return err
	}
	defer rc.Close()
	out, err := os.Create(pos[1])
	if err != nil {
		return err
	}
	n, err := io.Copy(out, rc)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	fmt.Printf("format: %s\nwrote: %s (%d bytes)\n", loc.format, pos[1], n)
	return nil
}
