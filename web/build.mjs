// Build the explorer and the console into dist/: each page's script bundled with what it
// imports (no CDN), minified, and a gzip copy of each file beside it (the gateway sends
// that to a browser that takes gzip).
import { build } from 'esbuild';
import { copyFile, mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { gzipSync } from 'node:zlib';

const out = 'dist';
await rm(out, { recursive: true, force: true });
await mkdir(out);
await build({
  entryPoints: ['src/explorer.js', 'src/console.js'],
  bundle: true,
  minify: true,
  format: 'esm',
  target: 'es2022',
  outdir: out,
  legalComments: 'eof',
  logLevel: 'warning',
});
for (const page of ['explorer.html', 'console.html', 'style.css']) await copyFile(`src/${page}`, `${out}/${page}`);
for (const name of await readdir(out)) {
  const data = await readFile(`${out}/${name}`);
  await writeFile(`${out}/${name}.gz`, gzipSync(data, { level: 9 }));
}
